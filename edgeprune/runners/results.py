"""Benchmark results on the host: the agent's JSON turned into typed records with statistics.

The agent (``edgeprune/runners/agent.py``) returns plain JSON; :func:`build_report` checks it,
maps board-side errors to edgeprune's exception types, and adds per-model statistics, drift
checks and speedups against the first model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from edgeprune import __version__
from edgeprune.errors import (
    DependencyError, DeviceError, InternalError, InvalidModelError, ModelNotFoundError, ParameterError, UserError,
)
from edgeprune.runners import agent
from edgeprune.runners.profile import ProfileSummary, aggregate
from edgeprune.runners.stats import DriftCheck, LatencyStats, Speedup, detect_drift, speedup, summarize

# agent error kind -> exception raised on the host (tests check every kind is mapped)
ERROR_TYPES: dict[str, type[Exception]] = {
    agent.BAD_REQUEST: ParameterError,
    agent.INPUT_ERROR: ParameterError,
    agent.MISSING_DEPENDENCY: DependencyError,
    agent.MISSING_PROVIDER: DeviceError,
    agent.PROVIDER_NOT_USED: DeviceError,
    agent.OUT_OF_MEMORY: DeviceError,
    agent.RUN_ERROR: DeviceError,
    agent.MODEL_NOT_FOUND: ModelNotFoundError,
    agent.MODEL_LOAD_ERROR: InvalidModelError,
    agent.INTERNAL_ERROR: DeviceError,
}


@dataclass(frozen=True)
class ModelSpec:
    """One model variant to benchmark, as the host knows it (``path`` is a local file)."""

    name: str
    path: str
    precision: str | None = None    # "fp32", "fp16" or None when not known (onnx not installed)
    source: str | None = None       # the user's file when ``path`` is a converted copy


@dataclass(frozen=True)
class ModelResult:
    """One model's figures from one benchmark session."""

    spec: ModelSpec
    sha256: str
    inputs: dict[str, Any]                  # input name -> [shape, dtype]
    samples_ms: tuple[float, ...]
    sample_start_s: tuple[float, ...]       # start of each timed run since measurement began
    warmup_ms: tuple[float, ...]
    providers_used: tuple[str, ...]
    metadata: dict[str, str]
    stats: LatencyStats
    drift: DriftCheck
    profile: tuple[dict, ...] | None = None  # {"op_type", "node", "provider", "dur_us"} per node
    profile_summary: ProfileSummary | None = None   # by op type and decoder layer
    outputs: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class IdealSpeedup:
    """The FLOPs-ideal speedup of ``name`` over ``baseline`` beside the measured one.

    ``ideal`` is decoder FLOPs(baseline) / FLOPs(name), counted by ``edgeprune inspect``'s
    :mod:`edgeprune.report.flops` from each graph as it is: the speedup if run time followed
    FLOPs exactly, the limit for these matmul-bound decoders on a CPU.
    """

    name: str
    baseline: str
    flops: int
    baseline_flops: int
    ideal: float
    measured: float | None           # the bench's median ratio (None: not comparable)

    @property
    def efficiency(self) -> float | None:
        """measured / ideal: 1.0 means run time shrank exactly as FLOPs did."""
        return None if self.measured is None else self.measured / self.ideal


@dataclass(frozen=True)
class BenchReport:
    """Everything one ``edgeprune bench`` produced; :meth:`to_dict` is the ``--json`` content."""

    device: str
    env: dict[str, Any]
    request: dict[str, Any]
    models: tuple[ModelResult, ...]
    speedups: tuple[Speedup, ...]            # models[1:] against models[0]
    interleaved: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    ideal: tuple[IdealSpeedup, ...] = field(default_factory=tuple)   # models[1:] with FLOPs on both sides

    def ideal_for(self, name: str) -> IdealSpeedup | None:
        return next((i for i in self.ideal if i.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        models = []
        for m in self.models:
            entry = asdict(m.spec)
            entry.update(sha256=m.sha256, inputs=m.inputs, stats=asdict(m.stats),
                         drift=dict(asdict(m.drift), drifting=m.drift.drifting),
                         providers_used=list(m.providers_used), samples_ms=list(m.samples_ms),
                         sample_start_s=list(m.sample_start_s), warmup_ms=list(m.warmup_ms),
                         metadata=m.metadata, profile=list(m.profile) if m.profile is not None else None,
                         profile_summary=asdict(m.profile_summary) if m.profile_summary is not None else None)
            if m.outputs is not None:
                entry["outputs"] = m.outputs
            models.append(entry)
        return {"edgeprune_version": __version__, "device": self.device, "env": self.env,
                "request": self.request, "interleaved": self.interleaved, "models": models,
                "speedups": [asdict(s) for s in self.speedups], "warnings": list(self.warnings),
                "ideal_speedups": [dict(asdict(i), measured_over_ideal=i.efficiency) for i in self.ideal]}


def raise_for_error(result: dict[str, Any], device: str) -> None:
    """Turn an agent result's ``error`` into the matching edgeprune exception."""
    if not isinstance(result, dict) or result.get("agent_version") != agent.AGENT_VERSION:
        version = result.get("agent_version") if isinstance(result, dict) else None
        raise InternalError(f"board agent on {device} answered protocol version {version!r}, "
                            f"expected {agent.AGENT_VERSION}; the pushed agent.py and edgeprune disagree")
    error = result.get("error")
    if error is None:
        return
    kind = error.get("type", agent.INTERNAL_ERROR)
    exc_type = ERROR_TYPES.get(kind, DeviceError)
    raise exc_type(f"on device {device}: {kind}: {error.get('message', '')}")


def _model_result(spec: ModelSpec, raw: dict[str, Any], node_layers: Mapping[str, int]) -> ModelResult:
    samples = tuple(float(x) for x in raw["samples_ms"])
    profile = tuple(raw["profile"]) if raw.get("profile") is not None else None
    return ModelResult(
        spec=spec, sha256=raw["sha256"], inputs=raw["inputs"], samples_ms=samples,
        sample_start_s=tuple(float(x) for x in raw.get("sample_start_s", ())),
        warmup_ms=tuple(float(x) for x in raw["warmup_ms"]),
        providers_used=tuple(raw.get("providers_used") or ()), metadata=dict(raw.get("metadata") or {}),
        stats=summarize(samples), drift=detect_drift(samples),
        profile=profile, outputs=raw.get("outputs"),
        profile_summary=aggregate(profile, node_layers, spec.name) if profile is not None else None,
    )


def inputs_differ(base: ModelResult, other: ModelResult) -> str | None:
    """Why ``other``'s latency ratio to ``base`` means nothing, or None when they take the same inputs.

    Same input names are required (a pruned, shrunk or fp16 variant keeps them; GPQ may change
    a shape on the query axis); models with other inputs are other models, and a "731x speedup"
    between them says nothing.
    """
    if set(base.inputs) == set(other.inputs):
        return None
    return (f"no speedup for {other.name} against {base.name}: their inputs differ ({other.name}: "
            f"{', '.join(sorted(other.inputs))}; {base.name}: {', '.join(sorted(base.inputs))}), so they are "
            "not variants of one model; --compare-anyway prints the ratio")


def build_report(result: dict[str, Any], specs: Sequence[ModelSpec], *, device: str,
                 request: dict[str, Any], node_layers: Mapping[str, Mapping[str, int]] | None = None,
                 compare_anyway: bool = False) -> BenchReport:
    """Check the agent's answer and compute statistics, drift and speedups vs ``specs[0]``.

    ``node_layers`` maps a model name to its node -> decoder layer map for the profile
    (:func:`edgeprune.runners.profile.graph_node_layers`); without it layers come from node names.
    """
    raise_for_error(result, device)
    raw_models = result.get("models") or []
    if len(raw_models) != len(specs):
        raise InternalError(f"agent on {device} returned {len(raw_models)} models for {len(specs)} requested")
    node_layers = node_layers or {}
    models = tuple(_model_result(spec, raw, node_layers.get(spec.name, {})) for spec, raw in zip(specs, raw_models))
    if any(not m.samples_ms for m in models):
        raise UserError(f"a model on {device} produced no timed samples; use --repeats >= 1")
    interleaved = bool(request.get("interleave", True))
    base = models[0]
    refused = {m.name: why for m in models[1:] if (why := inputs_differ(base, m)) and not compare_anyway}
    speedups = tuple(
        speedup(base.samples_ms, m.samples_ms, name=m.name, baseline_name=base.name,
                paired=interleaved and len(m.samples_ms) == len(base.samples_ms))
        for m in models[1:] if m.name not in refused)
    warnings = tuple(refused.values()) + tuple(m.drift.message(m.name) for m in models if m.drift.drifting)
    return BenchReport(device=device, env=dict(result.get("env") or {}), request=request, models=models,
                       speedups=speedups, interleaved=interleaved, warnings=warnings)
