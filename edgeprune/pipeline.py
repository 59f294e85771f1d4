"""The main job: export a default detector, prune it, convert it, benchmark every variant.

``edgeprune demo`` is a thin wrapper around :func:`run_demo`. Defaults reproduce one row of the
tgGBC paper's Table 1 (StreamPETR R50 704x256: 4224 keys, r=2000, n=1, k=900) and the GPQ
paper's 900 -> 300 query setting, on this machine, in a few minutes on 2 cores.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgeprune.errors import OutputPathError, ParameterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    model: str = "streampetr-r50-704x256"
    out_dir: Path = Path("edgeprune-demo")
    exporter: str = "torchscript"
    layers: int | None = None     # decoder layers (None: the preset's 6); fewer for quick runs
    r: int = 2000
    n: int = 1
    k: int | None = None          # None: every query, capped at the paper's 900 (the -light preset has 428)
    keep_queries: int = 300
    fp16: bool = True
    warmup: int = 3
    repeats: int = 30
    threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Artifact:
    """One model file the demo made, and how."""

    name: str
    path: Path
    how: str
    size_bytes: int
    check: str                    # validation / verification outcome, one phrase


@dataclass
class DemoResult:
    artifacts: list[Artifact] = field(default_factory=list)
    bench: object | None = None   # edgeprune.runners.results.BenchReport


def _size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _export(opts: DemoOptions, model: object) -> Artifact:
    from edgeprune.export.exporter import export_onnx

    path = opts.out_dir / "decoder.onnx"
    log.info("%s exporting %s decoder (%s) -> %s", _steps(opts)["export"], opts.model, opts.exporter, path)
    report = export_onnx(model, path, exporter=opts.exporter, seed=opts.seed)
    worst = max(o.max_abs for o in report.validation.outputs) if report.validation else float("nan")
    return Artifact("baseline", path, f"export {opts.model} decoder, {opts.exporter}", _size(path),
                    f"vs torch max|d|={worst:.1e}")


def calibration_inputs(model: object, samples: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random decoder inputs stacked as [S, B=1, ...] per input name (GPQ one-shot)."""
    draws = [model.example_inputs(batch=1, seed=seed + 100 + s) for s in range(samples)]  # type: ignore[attr-defined]
    return {name: np.stack([d[name].numpy() for d in draws]) for name in draws[0]}


def _rewrite(src: Path, dst: Path, name: str, how: str, passes: list, precision: str = "fp32",
             src_name: str = "baseline") -> Artifact:
    from edgeprune.passes.driver import rewrite

    report = rewrite(src, dst, passes, precision=precision)
    drift = report.verification.max_abs if report.verification is not None else None
    note = "outputs resized (not comparable)" if drift is None else f"vs {src_name} max|d|={drift:.1e}"
    return Artifact(name, dst, how, _size(dst), note)


def _tggbc(opts: DemoOptions, base: Path) -> Artifact:
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.passes.keys.tggbc import KeyPruningPass

    log.info("%s tgGBC key pruning r=%d n=%d k=%d", _steps(opts)["tggbc"], opts.r, opts.n, opts.k)
    return _rewrite(base, opts.out_dir / "decoder_tggbc.onnx", "tggbc",
                    f"tgGBC r={opts.r} n={opts.n} k={opts.k}",
                    [KeyPruningPass(TgGBCConfig(r=opts.r, n=opts.n, k=opts.k))])


def _gpq(opts: DemoOptions, base: Path, model: object) -> Artifact:
    from edgeprune.passes.queries.gpq import QueryPruningPass

    log.info("%s GPQ query shrinking to %d queries (one-shot ranking on seeded random inputs)",
             _steps(opts)["gpq"], opts.keep_queries)
    gpq_pass = QueryPruningPass(keep_queries=opts.keep_queries, calib=calibration_inputs(model, seed=opts.seed))
    return _rewrite(base, opts.out_dir / "decoder_gpq.onnx", "gpq",
                    f"GPQ one-shot keep {opts.keep_queries} queries", [gpq_pass])


def _fp16(opts: DemoOptions, src: Artifact) -> Artifact:
    dst = src.path.with_name(src.path.stem + "_fp16.onnx")
    return _rewrite(src.path, dst, src.name + "-fp16", src.how + ", fp16", [], precision="fp16",
                    src_name=src.name)


def check_demo_options(opts: DemoOptions) -> DemoOptions:
    """Every option checked against the preset before minutes of export and rewriting.

    Returns ``opts`` with ``k`` resolved. Raises the errors the steps would raise, earlier.
    """
    from edgeprune.methods.tggbc import TgGBCConfig
    from edgeprune.models.presets import get_preset
    from edgeprune.runners.bench import BenchOptions

    preset = get_preset(opts.model)
    d = preset.decoder
    layers = opts.layers if opts.layers is not None else d.num_layers
    if layers < 1:
        raise ParameterError(f"--layers must be >= 1 (got {layers}); the preset has {d.num_layers}")
    queries = d.num_queries + d.num_propagated
    opts = replace(opts, k=min(900, queries) if opts.k is None else opts.k)
    TgGBCConfig(r=opts.r, n=opts.n, k=opts.k).validate(preset.num_keys, layers, queries)
    if not 0 <= opts.keep_queries <= queries:
        raise ParameterError(f"--keep-queries must be in [0, {queries}] for {opts.model} ({queries} queries); "
                             f"got {opts.keep_queries}")
    BenchOptions(warmup=opts.warmup, repeats=opts.repeats, threads=opts.threads, seed=opts.seed).validate()
    if opts.out_dir.exists() and not opts.out_dir.is_dir():
        raise OutputPathError(f"{opts.out_dir} exists and is not a directory; choose another --out")
    return opts


def _steps(opts: DemoOptions) -> dict[str, str]:
    """Step labels ``[i/N]``: GPQ and fp16 are optional, so N depends on the options."""
    names = ["export", "tggbc"] + (["gpq"] if opts.keep_queries > 0 else []) + (["fp16"] if opts.fp16 else [])
    names.append("bench")
    return {name: f"[{i}/{len(names)}]" for i, name in enumerate(names, start=1)}


def build_models(opts: DemoOptions) -> list[Artifact]:
    """Export, then each rewrite; returns the artifacts in benchmark order (baseline first)."""
    opts = check_demo_options(opts)
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    from edgeprune.models.build import build_model

    model = build_model(opts.model, "decoder", seed=opts.seed, num_layers=opts.layers)
    base = _export(opts, model)
    made = [base, _tggbc(opts, base.path)]
    if opts.keep_queries > 0:
        made.append(_gpq(opts, base.path, model))
    if opts.fp16:
        log.info("%s fp16 conversion of the baseline and the tgGBC model", _steps(opts)["fp16"])
        made += [_fp16(opts, base), _fp16(opts, made[1])]
    return made


def run_demo(opts: DemoOptions, progress: Callable[[int, int], None] | None = None) -> DemoResult:
    """Build every variant and benchmark them interleaved on this machine."""
    from edgeprune.runners.bench import BenchOptions, benchmark

    opts = check_demo_options(opts)
    result = DemoResult(build_models(opts))
    log.info("%s benchmarking %d models interleaved (%d warm-up, %d repeats each)",
             _steps(opts)["bench"], len(result.artifacts), opts.warmup, opts.repeats)
    bench_opts = BenchOptions(warmup=opts.warmup, repeats=opts.repeats, threads=opts.threads, seed=opts.seed)
    result.bench = benchmark([a.path for a in result.artifacts], bench_opts, progress=progress)
    return result


def format_demo(result: DemoResult) -> str:
    """One table: what was made, its size and check, latency and speedup against the baseline."""
    bench = result.bench
    rows = [["model", "what", "MB", "check", "median ms", "speedup [CI]"]]
    stats = {m.spec.path: m for m in bench.models} if bench else {}
    speed = {s.name: s for s in bench.speedups} if bench else {}
    for a in result.artifacts:
        m = stats.get(str(a.path))
        sp = speed.get(m.name) if m else None
        rows.append([a.name, a.how, f"{a.size_bytes / 1e6:.1f}", a.check,
                     f"{m.stats.median:.1f}" if m else "-",
                     f"{sp.ratio:.2f}x [{sp.ci_low:.2f}, {sp.ci_high:.2f}]" if sp else "1.00x (baseline)"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
