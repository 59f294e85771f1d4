"""Decoder FLOPs before/after tgGBC from ``edgeprune inspect``, beside the paper's appendix Table 7.

Paper (Table 7): StreamPETR-VoVNet 1600x640 (24000 keys) 174.91 -> 61.44 GFLOPs at r=21000
(-64.88%); OPEN-R101 1408x512 (16896 keys) 123.55 -> 58.84 GFLOPs at r=12000 (-52.37%). The
table does not give n (the paper's standard setting is n=2; its ablations use n=1) nor k.

Exports each preset's decoder (no timing, so the machine's load does not matter) and runs
the CLI exactly as a user would, ``python -m edgeprune inspect MODEL.onnx --r R --n N --k K
--json``, for every n given; the table splits the decoder's FLOPs into cross-attention,
self-attention and FFN so the difference from the paper's count can be located.

    python benchmarks/flops_vs_paper.py                # both presets, n = 1 and 2 (~1 min)
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import _common as c

log = logging.getLogger("flops_vs_paper")
PAPER = {"streampetr-vov-1600x640": (21000, 174.91, 61.44), "open-r101-1408x512": (12000, 123.55, 58.84)}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PAPER), help="presets (default: the paper's two rows)")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2], help="pruning layers to report (default 1 2)")
    p.add_argument("--k", type=int, default=175, help="top queries for the importance (default 175)")
    p.add_argument("--out", type=Path, default=c.RESULTS, help="directory for the .json and .md results")
    p.add_argument("--quick", action="store_true", help="only the first preset, n=2")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.n = args.presets[:1], [2]
    return args


def inspect(path: Path, r: int, n: int, k: int) -> Dict[str, Any]:
    """``edgeprune inspect --json`` in a subprocess: the command line product path."""
    cmd = [sys.executable, "-m", "edgeprune", "inspect", str(path), "--r", str(r), "--n", str(n), "--k", str(k),
           "--json"]
    done = subprocess.run(cmd, cwd=c.REPO, capture_output=True, text=True, check=True)
    shown = ["edgeprune", "inspect", path.name, *cmd[5:]]
    return {"command": " ".join(shown), "result": json.loads(done.stdout)}


def parts(desc: Dict[str, Any]) -> Dict[str, float]:
    """GFLOPs of the whole decoder and its cross-attention / self-attention / FFN shares (before pruning)."""
    layers = desc["layers"]
    return {"total": desc["flops"]["total"] / 1e9, "cross": desc["flops"]["cross_attention"] / 1e9,
            "self": sum(layer["flops"]["self_attention"] or 0 for layer in layers) / 1e9,
            "ffn": sum(layer["flops"]["ffn"] or 0 for layer in layers) / 1e9}


def measure(preset: str, args: argparse.Namespace, work: Path) -> List[Dict[str, Any]]:
    r = PAPER.get(preset, (None,))[0]
    if r is None:
        raise SystemExit(f"no paper row for {preset}; choose from {', '.join(PAPER)}")
    _, exported = c.export_model(preset, "decoder", work / f"{preset}.onnx")
    rows = []
    for n in args.n:
        run = inspect(exported.path, r, n, args.k)
        desc, pruning = run["result"], run["result"]["pruning"]
        rows.append({"preset": preset, "r": r, "n": n, "k": args.k, "command": run["command"],
                     "before": parts(desc), "after": pruning["flops"]["total"] / 1e9,
                     "cross_after": pruning["flops"]["cross_attention"] / 1e9, "reduction": pruning["reduction"],
                     "keys_per_layer": pruning["keys_per_layer"], "num_keys": desc["num_keys"],
                     "self_keys": [layer["self_keys"] for layer in desc["layers"]]})
    return rows


def markdown(rows: List[Dict[str, Any]], command: str) -> str:
    """Whole decoder and cross-attention FLOPs beside the paper (whose counts are cross-attention only)."""
    lines = ["# Decoder FLOPs: `edgeprune inspect` vs the tgGBC paper's Table 7", "", f"command: `{command}`", "",
             "| model | r | n | k | keys per layer | decoder GFLOPs (cross + self + FFN) -> after | "
             "cross-attention GFLOPs -> after (change) | paper -> after (change) |", "|" + "---|" * 8]
    for row in rows:
        b, (_, pb, pa) = row["before"], PAPER[row["preset"]]
        lines.append(
            f"| {row['preset']} | {row['r']} | {row['n']} | {row['k']} | "
            f"{'/'.join(map(str, row['keys_per_layer']))} | "
            f"{b['total']:.2f} ({b['cross']:.2f} + {b['self']:.2f} + {b['ffn']:.2f}) -> {row['after']:.2f} "
            f"({-100 * row['reduction']:+.2f}%) | {b['cross']:.2f} -> {row['cross_after']:.2f} "
            f"({(row['cross_after'] / b['cross'] - 1) * 100:+.2f}%) | "
            f"{pb:.2f} -> {pa:.2f} ({(pa / pb - 1) * 100:+.2f}%) |")
    lines += ["", "Commands run (the .onnx is the preset's decoder, exported by this script with edgeprune's "
              "exporter):", ""]
    lines += [f"- `{row['command']}`" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    c.setup_logging(log.name)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flops-") as tmp:
        for preset in args.presets:
            rows += measure(preset, args, Path(tmp))
    text = markdown(rows, c.command_line())
    c.write_results(args.out / f"flops_vs_paper{'-quick' if args.quick else ''}",
                    {"benchmark": "flops_vs_paper", "args": vars(args), "rows": rows, "paper": PAPER}, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
