"""Benchmark orchestration: options -> agent request -> runner -> :class:`BenchReport`.

This is what ``edgeprune bench`` does, callable from Python::

    from edgeprune.runners.bench import BenchOptions, benchmark
    report = benchmark(["a.onnx", "b.onnx"], BenchOptions(repeats=100))
    report.speedups[0].ratio, report.speedups[0].ci_low, report.speedups[0].ci_high

``edgeprune bench`` calls :func:`benchmark` too, so the command line and Python share one
code path. Any runner with ``run(request) -> result`` inside ``with`` works with
:func:`run_bench`: the one :func:`edgeprune.runners.factory.get_runner` makes for a device.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edgeprune._lazy import available
from edgeprune.errors import ParameterError
from edgeprune.io import read_npz
from edgeprune.runners.factory import Runner, get_runner
from edgeprune.runners.precision import plan_models
from edgeprune.runners.profile import graph_node_layers
from edgeprune.runners.results import BenchReport, IdealSpeedup, ModelSpec, build_report

log = logging.getLogger(__name__)

# Short names accepted by --providers; anything else is passed to ORT unchanged.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "rknpu": "RknpuExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


@dataclass(frozen=True)
class BenchOptions:
    """How to measure. ``None`` for providers/threads/affinity means the device's default."""

    warmup: int = 5
    repeats: int = 50                       # upper bound when a time budget is set
    time_budget_s: float | None = None
    threads: int | None = None
    providers: tuple[tuple[str, Mapping[str, str]], ...] | None = None
    affinity: tuple[int, ...] | None = None
    seed: int = 0
    free_dims: Mapping[str, int] = field(default_factory=dict)
    npz: str | None = None
    interleave: bool = True
    profile: bool = False
    return_outputs: bool = False
    compare_anyway: bool = False        # speedup ratios also between models whose inputs differ

    def validate(self) -> "BenchOptions":
        checks = [("--warmup", self.warmup, 0), ("--repeats", self.repeats, 1), ("--seed", self.seed, 0)]
        if self.threads is not None:
            checks.append(("--threads", self.threads, 0))
        for flag, value, low in checks:
            if value < low:
                raise ParameterError(f"{flag} must be >= {low}, got {value}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ParameterError(f"--time-budget must be > 0 seconds, got {self.time_budget_s}")
        for name, value in self.free_dims.items():
            if value < 1:
                raise ParameterError(f"--free-dim {name}={value}: a dimension must be >= 1")
        if self.npz is not None:        # corrupt, NaN or missing: one line here, not on the board
            read_npz(self.npz, "--inputs file", "give an .npz with one array per model input")
        return self


def provider_name(name: str) -> str:
    """``cuda`` -> ``CUDAExecutionProvider``; full names pass through."""
    return PROVIDER_ALIASES.get(name.strip().lower(), name.strip())


def build_request(specs: Sequence[ModelSpec], options: BenchOptions) -> dict[str, Any]:
    """The agent request (protocol in ``edgeprune/runners/agent.py``); paths are local."""
    providers = options.providers or (("CPUExecutionProvider", {}),)
    return {
        "models": [{"name": s.name, "path": s.path} for s in specs],
        "warmup": options.warmup,
        "repeats": options.repeats,
        "time_budget_s": options.time_budget_s,
        "threads": options.threads,
        "providers": [[name, dict(opts)] for name, opts in providers],
        "inputs": {"seed": options.seed, "free_dims": dict(options.free_dims), "npz": options.npz},
        "interleave": options.interleave,
        "profile": options.profile,
        "affinity": list(options.affinity) if options.affinity is not None else None,
        "return_outputs": options.return_outputs,
    }


def run_bench(specs: Sequence[ModelSpec], options: BenchOptions, runner: Runner,
              device: str | None = None) -> BenchReport:
    """Run all ``specs`` in one agent request on an active ``runner`` and summarize.

    ``device`` labels the report; by default the runner's profile name (or "local").
    """
    if device is None:
        profile = getattr(runner, "profile", None)
        device = profile.name if profile is not None else "local"
    request = build_request(specs, options.validate())
    total = options.repeats * len(specs)
    log.info("timing %d model(s) on %s: %d warm-up + up to %d runs each%s%s", len(specs), device,
             options.warmup, options.repeats,
             f", time budget {options.time_budget_s:g} s" if options.time_budget_s else "",
             ", interleaved" if options.interleave and len(specs) > 1 else "")
    log.debug("request: %s (%d timed runs at most)", request, total)
    result = runner.run(request)
    node_layers = _profile_layers(specs) if options.profile else {}
    report = build_report(result, specs, device=device, request=request, node_layers=node_layers,
                          compare_anyway=options.compare_anyway)
    return replace(report, ideal=ideal_speedups(report, specs))


def ideal_speedups(report: BenchReport, specs: Sequence[ModelSpec]) -> tuple[IdealSpeedup, ...]:
    """FLOPs-ideal speedups vs the first model, when some model carries edgeprune's rewrite record.

    FLOPs come from ``inspect``'s count of each graph as it is (:func:`edgeprune.report.describe.graph_flops`,
    read while the fp16 copies exist); models whose decoder discovery does not find get none.
    Without onnx, or without a rewritten model among ``specs``, there is nothing to compare.
    """
    if len(specs) < 2 or not available("onnx"):
        return ()
    from edgeprune.report.describe import graph_flops, rewrite_recorded

    if not any(rewrite_recorded(s.path) for s in specs):
        return ()
    flops = [graph_flops(s.path) for s in specs]
    measured = {s.name: s.ratio for s in report.speedups}
    base = specs[0]
    return tuple(IdealSpeedup(s.name, base.name, f, flops[0], flops[0] / f, measured.get(s.name))
                 for s, f in zip(specs[1:], flops[1:]) if f and flops[0])


def _profile_layers(specs: Sequence[ModelSpec]) -> dict[str, dict[str, int]]:
    """Node -> decoder layer per model, read from the graphs while the (fp16) files exist."""
    if not available("onnx"):
        log.info("profile: decoder layers from node names only (install onnx to read dynamo name scopes)")
        return {}
    return {s.name: graph_node_layers(s.path) for s in specs}


def benchmark(paths: Sequence[str | Path], options: BenchOptions = BenchOptions(), *,
              precision: str | None = None, device: str | os.PathLike = "local",
              progress: Callable[[int, int], None] | None = None) -> BenchReport:
    """Benchmark model files (plus their fp16 / int8 variants per ``precision``) on ``device``.

    ``device`` is ``local`` (this machine, in this process) or a device profile name or path;
    unset providers/threads/affinity come from its profile, as on the command line.
    ``progress(done, total)`` is called after every timed run (``total`` is the upper bound).
    Converted copies live in a temporary directory removed on return, also on error.
    """
    options = options.validate()
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp:
        specs = plan_models(paths, precision, Path(tmp), calib_npz=options.npz, seed=options.seed)
        runner = get_runner(device, progress=progress)
        with runner:
            return run_bench(specs, with_device_defaults(options, runner.profile), runner)


def with_device_defaults(options: BenchOptions, profile: Any) -> BenchOptions:
    """Fill providers/threads/affinity the user left unset from a device profile."""
    return replace(
        options,
        providers=options.providers if options.providers is not None else tuple(profile.providers),
        threads=options.threads if options.threads is not None else profile.threads,
        affinity=options.affinity if options.affinity is not None else profile.affinity,
    )
