"""Benchmark output: terminal table, ``--json``, ``--csv`` (every raw sample) and ``--plot``.

JSON holds the whole :meth:`BenchReport.to_dict`. CSV is long format, one row per run (warm-up
and timed), each row carrying the environment (device, host, ORT version, providers,
threads) and the model's hash, so a spreadsheet or pandas needs no second file. Files are
written atomically (no half-written output when a run fails).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from edgeprune._lazy import require
from edgeprune.io import STDOUT, atomic_path, write_report
from edgeprune.runners.results import BenchReport

CSV_COLUMNS = ("device", "hostname", "machine", "ort_version", "providers", "threads", "model", "precision",
               "sha256", "decoder_flops", "ideal_speedup", "phase", "index", "start_s", "latency_ms")


def _ms(x: float) -> str:
    if x >= 100:
        return f"{x:.1f}"
    if x >= 10:
        return f"{x:.2f}"
    return f"{x:.3f}"


def format_environment(report: BenchReport) -> str:
    env = report.env
    providers = ",".join(env.get("providers_used") or [])
    threads = env.get("threads")
    return (f"device {report.device} ({env.get('hostname', '?')}, {env.get('machine', '?')}, "
            f"{env.get('cpu_count', '?')} cpus), onnxruntime {env.get('ort_version', '?')}, {providers}, "
            f"threads {threads if threads else 'default'}"
            + (f", affinity {env['affinity']}" if report.request.get("affinity") else "")
            + (", interleaved" if report.interleaved and len(report.models) > 1 else "")
            + (", workers stop spinning after each run" if env.get("stop_spinning") else ""))


def _table_rows(report: BenchReport) -> list[list[str]]:
    level = report.models[0].stats.ci_level
    header = ["model", "prec", "n", "median ms", f"CI {min(level, 0.95):.0%}", "min", "mean", "p90", "p99",
              "std", "speedup", "speedup CI"] + (["ideal", "meas/ideal"] if report.ideal else [])
    rows = [header]
    speedups = {s.name: s for s in report.speedups}
    for m in report.models:
        s = m.stats
        sp = speedups.get(m.name)
        rows.append([
            m.name, m.spec.precision or "-", str(s.n), _ms(s.median), f"[{_ms(s.ci_low)}, {_ms(s.ci_high)}]",
            _ms(s.min), _ms(s.mean), _ms(s.p90), _ms(s.p99), _ms(s.std),
            *_speedup_cells(sp, m is report.models[0], len(report.models)),
            *(_ideal_cells(report, m.name, m is report.models[0]) if report.ideal else []),
        ])
    return rows


def _ideal_cells(report: BenchReport, name: str, is_base: bool) -> list[str]:
    """(FLOPs-ideal speedup, measured / ideal) cells; "-" where the FLOPs or the ratio are unknown."""
    if is_base:
        return ["1.00x", "-"]
    ideal = report.ideal_for(name)
    if ideal is None:
        return ["-", "-"]
    eff = ideal.efficiency
    return [f"{ideal.ideal:.2f}x", "-" if eff is None else f"{eff:.2f}"]


def _flops_columns(report: BenchReport, name: str) -> dict[str, str]:
    """CSV's decoder_flops / ideal_speedup of one model (empty when the bench counted none)."""
    if not report.ideal:
        return {"decoder_flops": "", "ideal_speedup": ""}
    if name == report.models[0].name:
        return {"decoder_flops": str(report.ideal[0].baseline_flops), "ideal_speedup": "1.0"}
    ideal = report.ideal_for(name)
    return ({"decoder_flops": str(ideal.flops), "ideal_speedup": repr(ideal.ideal)} if ideal is not None
            else {"decoder_flops": "", "ideal_speedup": ""})


def _speedup_cells(sp: Any, is_base: bool, count: int) -> list[str]:
    """(ratio, CI) cells: the baseline, a measured ratio, or "-" where inputs differ (see the warning)."""
    if count < 2:
        return ["-", "-"]
    if is_base:
        return ["1.00x", "baseline"]
    if sp is None:
        return ["-", "inputs differ"]
    return [f"{sp.ratio:.2f}x", f"[{sp.ci_low:.2f}, {sp.ci_high:.2f}]"]


def format_table(report: BenchReport) -> str:
    """The terminal table: one row per model, latency statistics and speedup vs the first."""
    rows = _table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [format_environment(report)]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if report.ideal:
        lines.append("ideal: decoder FLOPs of the first model / FLOPs of this one (as `edgeprune inspect` counts "
                     "them); meas/ideal = speedup / ideal")
    if any(s.ci_level < 0.95 for s in (m.stats for m in report.models)):
        lines.append("note: fewer than 6 samples: the median CI is [min, max] with coverage below 95 %")
    return "\n".join(lines)


def write_json(report: BenchReport, path: str | Path) -> Path:
    """``report`` as JSON to ``path`` (atomically) or to stdout for ``-``."""
    return write_report(path, json.dumps(report.to_dict(), indent=1), suffix=".json")


def csv_rows(report: BenchReport) -> list[dict[str, Any]]:
    """One dict per run (warm-up and timed) with the environment; floats as ``repr`` (exact)."""
    env = report.env
    common = {"device": report.device, "hostname": env.get("hostname"), "machine": env.get("machine"),
              "ort_version": env.get("ort_version"), "providers": ";".join(env.get("providers_used") or []),
              "threads": env.get("threads") if env.get("threads") is not None else ""}
    rows: list[dict[str, Any]] = []
    for m in report.models:
        base = dict(common, model=m.name, precision=m.spec.precision or "", sha256=m.sha256,
                    **_flops_columns(report, m.name))
        rows += [dict(base, phase="warmup", index=i, start_s="", latency_ms=repr(x)) for i, x in enumerate(m.warmup_ms)]
        starts: Sequence[Any] = m.sample_start_s or [""] * len(m.samples_ms)
        rows += [dict(base, phase="timed", index=i, start_s=repr(t) if t != "" else "", latency_ms=repr(x))
                 for i, (x, t) in enumerate(zip(m.samples_ms, starts))]
    return rows


def write_csv(report: BenchReport, path: str | Path) -> Path:
    """One row per run to ``path`` (atomically) or to stdout for ``-``."""
    if str(path) == STDOUT:
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(report))
        sys.stdout.flush()
        return Path(STDOUT)
    target = Path(path)
    with atomic_path(target, suffix=".csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(report))
    return target


def write_plot(report: BenchReport, path: str | Path) -> Path:
    """PNG: latency distribution per model (box + points) and latency over the run (drift)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    names = [m.name for m in report.models]
    fig, (dist, over_time) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.6 * len(names) + 2.5))
    try:
        major, minor = (int(v) for v in matplotlib.__version__.split(".")[:2])
        horizontal = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}
        dist.boxplot([list(m.samples_ms) for m in report.models], showfliers=False, **horizontal)
        for i, m in enumerate(report.models, start=1):
            jitter = [i + 0.15 * ((k * 0.618) % 1.0 - 0.5) for k in range(len(m.samples_ms))]
            dist.scatter(m.samples_ms, jitter, s=6, alpha=0.4)
        dist.set_yticks(range(1, len(names) + 1), names)
        dist.invert_yaxis()   # baseline on top, as in the table
        values = [x for m in report.models for x in m.samples_ms]
        if min(values) > 0 and max(values) / min(values) > 20:
            dist.set_xscale("log")
            over_time.set_yscale("log")
        dist.set_xlabel("latency (ms)")
        dist.set_title("distribution")
        for m in report.models:
            x = m.sample_start_s if m.sample_start_s else range(len(m.samples_ms))
            over_time.plot(x, m.samples_ms, ".", ms=3, label=m.name)
        over_time.set_xlabel("time since start (s)" if report.models[0].sample_start_s else "repeat")
        over_time.set_ylabel("latency (ms)")
        over_time.set_title("over the run")
        over_time.legend(fontsize="small")
        fig.suptitle(format_environment(report), fontsize="small")
        fig.tight_layout()
        target = Path(path)
        with atomic_path(target, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return target
