"""Helpers shared by the benchmark scripts: machine facts, export, timing, speedups, drift, output.

The scripts are run from a checkout (``python benchmarks/<name>.py``), so this module puts the
repository root on ``sys.path``. Everything heavy (torch, onnx, onnxruntime) is imported inside
the functions that need it.

Why these helpers exist: the machine the numbers come from is small and shared (2 cores, other
work running), so every result records the CPU, the ONNX Runtime version, the thread setting
and the load average at the start and the end, and every comparison is timed interleaved in
one session (one round = each model once, in order) so that load changes hit all models alike.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edgeprune.io import atomic_path  # noqa: E402

log = logging.getLogger("benchmarks")
RESULTS = REPO / "benchmarks" / "results"
OUTPUTS = ("all_cls_scores", "all_bbox_preds")


def setup_logging(script: str) -> None:
    """INFO lines of the script's logger, ``benchmarks`` and ``edgeprune`` to stderr, once each.

    Not the root logger: edgeprune's commands (run in-process) attach their own handler to
    ``edgeprune`` and a root handler would print their lines twice, and ONNX Runtime's
    quantizer logs one root INFO line per unquantized tensor. Its module-level
    ``logging.info`` would give the root a handler on first use (``basicConfig``) unless the
    root has one: a NullHandler.
    """
    from edgeprune.cli.main import setup_logging as setup_edgeprune_logging

    setup_edgeprune_logging(False)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    for name in (script, "benchmarks"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# ---------------------------------------------------------------- the machine
def add_timing_arguments(p: Any, *, warmup: int = 3, repeats: int = 30) -> None:
    """The timing options of ``edgeprune bench`` (one definition, ``edgeprune.cli.args``) plus --out."""
    from edgeprune.cli.args import add_timing_arguments as add_cli_timing_arguments

    add_cli_timing_arguments(p, warmup=warmup, repeats=repeats)
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for the .json and .md results")


def load_average() -> Tuple[float, float, float]:
    """1, 5 and 15 minute load averages (/proc/loadavg)."""
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo (``platform.processor()`` is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(threads: Optional[int]) -> Dict[str, Any]:
    """What a reader needs to judge the figures: CPUs, CPU model, ORT version, threads, load now."""
    import onnxruntime

    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
            "ort_version": onnxruntime.__version__, "python": platform.python_version(),
            "threads": threads if threads else "ORT default (intra-op = physical cores)",
            "load_start": load_average(), "git": git_state()}


def git_state() -> Dict[str, Any]:
    """HEAD and the files of the package with uncommitted changes (others may be editing the tree)."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.rstrip() if done.returncode == 0 else "?"   # keep status lines' leading space

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "edgeprune").splitlines()]
    return {"head": git("rev-parse", "--short", "HEAD"), "dirty_package_files": dirty}


def command_line() -> str:
    """The command that produced a result, as a user types it at the repository root.

    No machine path is recorded: the script and the interpreter are written relative to the
    repository root (``.venv/bin/python benchmarks/bench_gpq.py ...``); an interpreter outside
    the checkout is written as ``python``. Arguments naming files are made portable too.
    """
    python = Path(os.path.abspath(sys.executable))
    shown = python.relative_to(REPO).as_posix() if python.is_relative_to(REPO) else "python"
    script = portable(Path(os.path.abspath(sys.argv[0])))
    return shlex.join([shown, script, *(str(portable(a)) for a in sys.argv[1:])])


def portable(value: Any) -> Any:
    """``value`` with every machine path made machine-independent, recursively (dicts, lists).

    A path inside the checkout becomes relative to the repository root; any other absolute
    path (a temporary model file) keeps only its file name; a relative ``Path`` becomes a string.
    A string counts as a path when it names an existing file or lies under the checkout or the
    temp dir (ONNX tensor names such as ``/model/head/Softmax_output_0`` are left alone).
    """
    if isinstance(value, Mapping):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if not (isinstance(value, Path) or isinstance(value, str) and _is_machine_path(value)):
        return value
    path = Path(value)
    if not path.is_absolute():
        return path.as_posix()
    path = Path(os.path.abspath(path))
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name


def _is_machine_path(text: str) -> bool:
    if not text.startswith("/") or any(ch.isspace() for ch in text):
        return False
    roots = (str(REPO), tempfile.gettempdir())
    return any(text == r or text.startswith(r.rstrip("/") + "/") for r in roots) or os.path.exists(text)


def machine_line(facts: Mapping[str, Any]) -> str:
    """One markdown line: CPUs, model, ORT, threads and the load at the start and the end."""
    start, end = facts["load_start"], facts.get("load_end", ("?", "?", "?"))
    return (f"machine: {facts['nproc']} CPUs ({facts['cpu_model']}), onnxruntime {facts['ort_version']} "
            f"CPUExecutionProvider, threads {facts['threads']}; load average (1/5/15 min) "
            f"{' '.join(map(str, start))} at start, {' '.join(map(str, end))} at end; code at "
            f"{facts['git']['head']}" + (f" with {len(facts['git']['dirty_package_files'])} uncommitted edgeprune/ "
                                         "files (a refactor in progress)" if facts['git']['dirty_package_files'] else ""))


# ---------------------------------------------------------------- models
def export_model(preset: str, scope: str, path: Path, *, layers: Optional[int] = None,
                 exporter: str = "torchscript", batch: int = 1, simplify: bool = True) -> Any:
    """Build ``preset`` (seeded random weights) at ``scope`` and export it; returns (model, report)."""
    from edgeprune.export.exporter import export_onnx
    from edgeprune.models.build import build_model

    model = build_model(preset, scope, num_layers=layers)
    report = export_onnx(model, path, exporter=exporter, batch=batch, simplify=simplify)
    log.info("%s", report.summary())
    return model, report


def timed_rewrite(src: Path, dst: Path, passes: Sequence[Any], precision: Any = "fp32") -> float:
    """``edgeprune.passes.driver.rewrite`` without its verification run; returns the seconds taken.

    ``precision``: a registered precision name, or a precision pass instance (static int8 needs
    one built with its calibration data).
    """
    from edgeprune.passes.driver import rewrite

    started = time.perf_counter()
    report = rewrite(src, dst, list(passes), precision=precision, verify=False)
    seconds = time.perf_counter() - started
    log.info("rewrote %s -> %s (%s, %s): %d -> %d nodes in %.2f s", src.name, dst.name,
             ", ".join(report.passes) or "no pass", precision, report.nodes_before, report.nodes_after, seconds)
    return seconds


def output_drift(reference: Path, candidates: Mapping[str, Path],
                 feeds: Mapping[str, Any]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Max and mean abs difference of each candidate's outputs from the reference model's.

    ``feeds``: input name -> numpy array (the model's own example inputs). Returns
    ``{candidate: {output: {"max_abs", "mean_abs", "max_abs_last_layer"}}}``; outputs are
    ``[L, B, Nq, C]``, the last layer is the one a detector's post-processing reads.
    """
    import numpy as np

    ref = _run_once(reference, feeds)
    drift: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, path in candidates.items():
        out = _run_once(path, feeds)
        drift[name] = {}
        for key in OUTPUTS:
            diff = np.abs(out[key].astype(np.float64) - ref[key].astype(np.float64))   # [L, B, Nq, C]
            drift[name][key] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                                "max_abs_last_layer": float(diff[-1].max())}
    return drift


def _run_once(path: Path, feeds: Mapping[str, Any]) -> Dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))


# ---------------------------------------------------------------- timing and statistics
def time_models(paths: Sequence[Path], *, warmup: int, repeats: int, threads: Optional[int],
                time_budget: Optional[float] = None, profile: bool = False) -> Any:
    """All models timed interleaved in one session (``edgeprune.runners.bench.benchmark``);
    ``profile``: afterwards, each model's per-node kernel times from its own profiling session."""
    from edgeprune.runners.bench import BenchOptions, benchmark

    options = BenchOptions(warmup=warmup, repeats=repeats, time_budget_s=time_budget, threads=threads,
                           seed=0, interleave=True, profile=profile)
    return benchmark([str(p) for p in paths], options)


@dataclass(frozen=True)
class Row:
    """One model's line in a results table; ``speedup`` is against ``baseline`` (None for a baseline)."""

    label: str
    model: str
    stats: Any                      # edgeprune.runners.stats.LatencyStats
    baseline: Optional[str]         # the baseline's label
    speedup: Any                    # edgeprune.runners.stats.Speedup or None
    ideal: Optional[float] = None   # decoder FLOPs(baseline) / FLOPs(model), as `edgeprune inspect` counts them

    @property
    def efficiency(self) -> Optional[float]:
        """measured / ideal speedup (None when either is unknown)."""
        return self.speedup.ratio / self.ideal if self.speedup is not None and self.ideal else None


def report_flops(report: Any) -> Dict[str, int]:
    """Model name -> decoder FLOPs, as ``edgeprune bench`` counted them for its ideal speedups
    (it does when a model carries edgeprune's rewrite record); {} otherwise."""
    out: Dict[str, int] = {}
    for i in report.ideal:
        out[i.name], out[i.baseline] = i.flops, i.baseline_flops
    return out


def rows(report: Any, labels: Mapping[str, str], baselines: Mapping[str, str],
         flops: Optional[Mapping[str, Optional[int]]] = None) -> List[Row]:
    """Table rows; each speedup is a paired bootstrap over the interleaved rounds against its baseline.

    ``flops`` (model name -> decoder FLOPs; default: :func:`report_flops`) gives each row its
    FLOPs-ideal speedup against the same baseline.
    """
    from edgeprune.runners.stats import speedup

    flops = report_flops(report) if flops is None else flops
    by_name = {m.name: m for m in report.models}
    out = []
    for m in report.models:
        base = baselines.get(m.name)
        sp, ideal = None, None
        if base is not None:
            sp = speedup(by_name[base].samples_ms, m.samples_ms, name=m.name, baseline_name=base, paired=True)
            if flops.get(base) and flops.get(m.name):
                ideal = flops[base] / flops[m.name]
        out.append(Row(labels.get(m.name, m.name), m.name, m.stats, labels.get(base, base) if base else None, sp,
                       ideal))
    return out


def table(rows_: Sequence[Row], extra: Optional[Mapping[str, Sequence[str]]] = None,
          extra_header: Sequence[str] = ()) -> List[str]:
    """Markdown table: median, its CI, p90, std, runs, speedup with CI, the FLOPs-ideal speedup,
    measured / ideal, and run-time change."""
    head = ["model", "median ms", "95% CI of the median", "p90 ms", "std ms", "runs", "speedup (95% CI)",
            "ideal", "measured / ideal", "time change", *extra_header]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows_:
        s, sp = r.stats, r.speedup
        cells = [r.label, f"{s.median:.1f}", f"[{s.ci_low:.1f}, {s.ci_high:.1f}]", f"{s.p90:.1f}", f"{s.std:.1f}",
                 str(s.n),
                 f"{sp.ratio:.2f}x [{sp.ci_low:.2f}, {sp.ci_high:.2f}] vs {r.baseline}" if sp else "baseline",
                 f"{r.ideal:.2f}x" if r.ideal else "-", f"{r.efficiency:.2f}" if r.efficiency else "-",
                 f"{(1 / sp.ratio - 1) * 100:+.1f}%" if sp else "-", *((extra or {}).get(r.model, ()))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def drift_warnings(report: Any) -> List[str]:
    """The runner's warnings (e.g. later repeats slower than earlier ones) as markdown bullets."""
    return [f"- runner warning: {w}" for w in report.warnings]


# ---------------------------------------------------------------- output
def write_results(stem: Path, result: Mapping[str, Any], markdown: str) -> None:
    """``<stem>.json`` (everything, raw samples included) and ``<stem>.md``, each written atomically.

    Paths in ``result`` are recorded through :func:`portable` (no machine paths in results).
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(stem.with_suffix(".json"), suffix=".json") as tmp:
        tmp.write_text(json.dumps(portable(result), indent=1, default=str))
    with atomic_path(stem.with_suffix(".md"), suffix=".md") as tmp:
        tmp.write_text(markdown)
    log.info("wrote %s.json and %s.md", stem, stem)


def finish(facts: Dict[str, Any]) -> Dict[str, Any]:
    """Record the load average at the end of the measurement."""
    facts["load_end"] = load_average()
    return facts
