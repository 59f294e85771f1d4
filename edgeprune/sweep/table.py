"""A sweep's results as a table (md, csv, json), a latency-vs-mAP plot with its Pareto front, and
the recommended setting.

The rule is tgGBC's: the best setting is the fastest whose mAP is at most ``max_map_drop``
points (1 point = 0.01 mAP) below the unpruned fp32 baseline's. "Fastest" is the largest
speedup over the baseline measured in the same interleaved request (paired: robust to the
load changing between settings). The plot's latency axis and the Pareto front use the same
figure in milliseconds: the baseline's median divided by the setting's paired speedup; the
table also gives each setting's raw median latency from its own request.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edgeprune.io import atomic_path, write_report
from edgeprune.sweep.settings import BASELINE, Setting
from edgeprune.sweep.store import SweepStore

COLUMNS = ("setting", "method", "r", "n", "k", "precision", "mAP", "map_drop_points", "NDS", "latency_ms",
           "paired_latency_ms", "speedup", "speedup_ci", "device", "pareto", "within_budget")


@dataclass(frozen=True)
class SweepTable:
    rows: tuple[dict[str, Any], ...]           # one per finished setting, in grid order
    baseline_map: float
    max_map_drop: float                        # points
    recommended: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_mAP": self.baseline_map, "max_map_drop_points": self.max_map_drop,
                "recommended": self.recommended["setting"] if self.recommended else None, "rows": list(self.rows)}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (latency, mAP) points: True where no other point is at least as fast and as accurate, and better in one."""
    def dominated(i: int) -> bool:
        li, mi = points[i]
        return any(lj <= li and mj >= mi and (lj < li or mj > mi) for j, (lj, mj) in enumerate(points) if j != i)
    return [not dominated(i) for i in range(len(points))]


def build_table(store: SweepStore, grid: Sequence[Setting], max_map_drop: float) -> SweepTable:
    """Rows of the finished settings of ``grid`` against the fp32 baseline's mAP."""
    results = [store.read_result(s.id) for s in grid if store.finished(s.id)]
    base = next(r for r in results if r["setting"]["id"] == f"{BASELINE}-fp32")
    rows = []
    for r in results:
        s, drop = r["setting"], round(100.0 * (base["mAP"] - r["mAP"]), 9) + 0.0      # no "-0.00"
        rows.append({"setting": s["id"], "method": s["method"], "r": s["r"], "n": s["n"],
                     "k": s["k"] if s["method"] == "tggbc" else "", "precision": s["precision"], "mAP": r["mAP"],
                     "map_drop_points": drop, "NDS": r["NDS"], "latency_ms": r["latency_ms"]["median"],
                     "paired_latency_ms": base["latency_ms"]["median"] / r["speedup"]["ratio"],
                     "speedup": r["speedup"]["ratio"],
                     "speedup_ci": [r["speedup"]["ci_low"], r["speedup"]["ci_high"]], "device": r["device"],
                     "within_budget": drop <= max_map_drop + 1e-9})
    for row, front in zip(rows, pareto_front([(row["paired_latency_ms"], row["mAP"]) for row in rows])):
        row["pareto"] = front
    ok = [row for row in rows if row["within_budget"]]
    best = max(ok, key=lambda row: row["speedup"]) if ok else None
    return SweepTable(tuple(rows), base["mAP"], max_map_drop, best)


def format_markdown(table: SweepTable) -> str:
    head = ["setting", "mAP", "drop (pts)", "NDS", "latency ms", "speedup", "device", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        mark = " **(recommended)**" if table.recommended is row else ""
        lines.append(f"| {row['setting']}{mark} | {row['mAP']:.4f} | {row['map_drop_points']:+.2f} | {row['NDS']:.4f} | "
                     f"{row['latency_ms']:.2f} | {row['speedup']:.2f}x [{row['speedup_ci'][0]:.2f}, "
                     f"{row['speedup_ci'][1]:.2f}] | {row['device']} | {'yes' if row['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def format_csv(table: SweepTable) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        writer.writerow(dict(row, speedup_ci=f"{row['speedup_ci'][0]:.4f}-{row['speedup_ci'][1]:.4f}"))
    return buf.getvalue()


def recommendation_line(table: SweepTable) -> str:
    best = table.recommended
    if best is None or best["method"] == BASELINE and best["precision"] == "fp32":
        return (f"recommended: the unpruned baseline (mAP {table.baseline_map:.4f}): no faster setting stays within "
                f"{table.max_map_drop:g} mAP point(s)")
    return (f"recommended: {best['setting']} ({best['speedup']:.2f}x faster, mAP {best['mAP']:.4f}, "
            f"{best['map_drop_points']:+.2f} points vs the baseline's {table.baseline_map:.4f}; budget "
            f"{table.max_map_drop:g} point(s))")


def write_outputs(table: SweepTable, root: Path) -> list[Path]:
    """table.md, table.csv, table.json and pareto.png (plot only when matplotlib is installed)."""
    from edgeprune._lazy import available

    paths = [write_report(root / "table.md", format_markdown(table), suffix=".md"),
             write_report(root / "table.csv", format_csv(table), suffix=".csv"),
             write_report(root / "table.json", json.dumps(table.to_dict(), indent=1) + "\n", suffix=".json")]
    if available("matplotlib"):
        paths.append(write_plot(table, root / "pareto.png"))
    return paths


def write_plot(table: SweepTable, path: Path) -> Path:
    """Latency (x) vs mAP (y), one marker per method, the Pareto front as a line, the budget shaded."""
    from edgeprune._lazy import require

    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        markers = dict(zip(sorted({r["method"] for r in table.rows}), "os^DvP*X"))
        for method, marker in markers.items():
            for precision, colour in (("fp32", "tab:blue"), ("fp16", "tab:orange"), ("int8-dynamic", "tab:purple")):
                rows = [r for r in table.rows if r["method"] == method and r["precision"] == precision]
                if rows:
                    ax.scatter([r["paired_latency_ms"] for r in rows], [r["mAP"] for r in rows], marker=marker, c=colour,
                               label=f"{method} {precision}", zorder=3)
        front = sorted((r["paired_latency_ms"], r["mAP"]) for r in table.rows if r["pareto"])
        ax.step([p[0] for p in front], [p[1] for p in front], "k--", where="post", lw=1, label="Pareto front",
                zorder=2)
        ax.axhspan(table.baseline_map - table.max_map_drop / 100, table.baseline_map, color="tab:green", alpha=0.12,
                   label=f"within {table.max_map_drop:g} mAP pt")
        for r in table.rows:
            ax.annotate(r["setting"], (r["paired_latency_ms"], r["mAP"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        if table.recommended is not None:
            best = table.recommended
            ax.scatter([best["paired_latency_ms"]], [best["mAP"]], s=220, facecolors="none", edgecolors="tab:red",
                       label="recommended", zorder=4)
        ax.set_xlabel("latency (ms): baseline median / paired speedup")
        ax.set_ylabel("mAP")
        ax.set_title("sweep: latency vs mAP")
        ax.legend(fontsize="small")
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return path
