"""Do two checkouts rewrite the presets into models that compute the same outputs?

A check for refactors that must not change behaviour. ``record`` exports the preset decoders
once (reusing exports already in DIR), rewrites them with every pass through the CLI of the
checkout given by ``--repo`` (tgGBC n=2 k=175 and n=1 k=0, ToMe, GPQ with fixed keep indices,
fp16 of the tgGBC model, r=0), runs every model on seeded inputs with ONNX Runtime and saves
the outputs; ``compare`` reports which outputs differ between two such records, and by how much.

    .venv/bin/python scripts/same_outputs.py record --repo . --out before   # on the old commit's checkout
    .venv/bin/python scripts/same_outputs.py record --repo . --out after    # on the new one
    .venv/bin/python scripts/same_outputs.py compare before after

Bit-identical is the bar for a pure refactor; exits 1 when any output differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

DECODERS = [("streampetr-r50-704x256", "torchscript"), ("streampetr-r50-704x256", "dynamo"),
            ("petr-r50-800x320", "torchscript"), ("streampetr-vov-1600x640", "torchscript")]
REWRITES = {
    "tggbc": ["--method", "tggbc", "--r", "2000", "--n", "2", "--k", "175"],
    "tggbc1": ["--method", "tggbc", "--r", "1000", "--n", "1", "--k", "0"],
    "tome": ["--method", "tome", "--r", "1000", "--n", "1"],
    "gpq": ["--method", "gpq", "--keep-indices", "KEEP"],
    "r0": ["--method", "tggbc", "--r", "0", "--n", "1"],
}


def _edgeprune(repo: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo.resolve()))
    subprocess.run([sys.executable, "-m", "edgeprune", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _outputs(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng, feeds = np.random.default_rng(0), {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}[i.type]
        feeds[i.name] = np.zeros(shape, bool) if dtype is np.bool_ else rng.standard_normal(shape).astype(dtype)
    return {f"{path.name}::{o.name}": v for o, v in zip(sess.get_outputs(), sess.run(None, feeds))}


def record(repo: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keep = out / "keep.json"
    keep.write_text(json.dumps(list(range(0, 900, 3))))
    results: dict[str, np.ndarray] = {}
    for preset, exporter in DECODERS:
        base = out / f"{preset}_{exporter}.onnx"
        if not base.exists():
            _edgeprune(repo, "export", "--model", preset, "--scope", "decoder", "--exporter", exporter, "-o", str(base))
        models = [base]
        for name, args in REWRITES.items():
            target = out / f"{base.stem}_{name}.onnx"
            _edgeprune(repo, "rewrite", str(base), "-o", str(target), "--no-verify",
                       *[str(keep) if a == "KEEP" else a for a in args])
            models.append(target)
        half = out / f"{base.stem}_tggbc16.onnx"
        _edgeprune(repo, "rewrite", str(out / f"{base.stem}_tggbc.onnx"), "-o", str(half), "--method", "none",
                   "--precision", "fp16", "--no-verify")
        for model in models + [half]:
            results.update(_outputs(model))
        print(f"{preset} {exporter}: {len(models) + 1} models", flush=True)
    np.savez(out / "outputs.npz", **results)


def compare(a: Path, b: Path) -> int:
    left, right = np.load(a / "outputs.npz"), np.load(b / "outputs.npz")
    names = sorted(set(left) | set(right))
    differ = 0
    for name in names:
        if name not in left or name not in right:
            print(f"only in one record: {name}")
            differ += 1
        elif left[name].shape != right[name].shape or not np.array_equal(left[name], right[name], equal_nan=True):
            gap = np.abs(left[name].astype(np.float64) - right[name]).max() if left[name].shape == right[name].shape \
                else "shape"
            print(f"differs: {name} (max abs {gap})")
            differ += 1
    print(f"{len(names)} outputs compared, {differ} differ")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="export, rewrite and run the presets with one checkout")
    rec.add_argument("--repo", type=Path, default=Path("."), help="checkout whose edgeprune is used (default .)")
    rec.add_argument("--out", type=Path, required=True, help="folder for the models and outputs.npz")
    cmp_ = sub.add_parser("compare", help="compare two records")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "record":
        record(args.repo, args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
