"""``edgeprune sweep`` end to end on a tiny whole model (48 keys, 3 layers) and a 3-scene dataset:
real rewrites, real ORT timing through the local runner, real evaluation; resuming redoes no
finished setting; two boards share the queue; bad input is refused in one line, before any output."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import handwritten_decoder as hd
from edgeprune.cli.main import main
from edgeprune.data.synth import generate_dataset
from edgeprune.evaluation.evaluate import evaluate_model
from edgeprune.export.exporter import export_onnx
from edgeprune.models.build import build_model
from edgeprune.models.config import DecoderConfig, ModelPreset
from edgeprune.sweep.settings import Setting, build_grid
from edgeprune.sweep.table import pareto_front

TINY = ModelPreset("tiny-r18-64x32", "petr", "resnet18", (64, 32),
                   decoder=DecoderConfig(num_layers=3, embed_dims=64, num_heads=4, ffn_dims=128, num_queries=40,
                                         num_classes=4))               # 6 x 4 x 2 = 48 keys
FAST = ("--repeats", "3", "--warmup", "1")


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    generate_dataset(str(root / "data"), 3, 5, TINY.image_size)
    export_onnx(build_model(TINY, "full", seed=0), root / "full.onnx", simplify=False)
    return root / "full.onnx", root / "data"


def _files(out: Path) -> dict[str, int]:
    """mtime (ns) of every per-setting file: a resumed sweep must not touch the finished ones."""
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for sub in ("models", "results") for p in (out / sub).iterdir()}


@pytest.mark.slow
def test_sweep_resumes_and_two_boards_share_the_work(tiny, tmp_path: Path) -> None:
    model, data = tiny
    out = tmp_path / "sweep"
    code, text = _cli("sweep", model, "--data", data, "--r", "50%", "--n", "1", "--method", "tggbc,random",
                      "--out", out, *FAST)
    assert code == 0, text
    first = _files(out)
    assert sorted(first) == sorted(f"{d}/{s}.{e}" for s in ("none-fp32", "tggbc-r24-n1-k0-fp32", "random-r24-n1-s0-fp32")
                                   for d, e in (("models", "onnx"), ("results", "json")))
    assert "recommended: " in text

    board = tmp_path / "local-b.json"          # a second board of the same kind: another local profile
    board.write_text(json.dumps({"transport": "local", "providers": [["CPUExecutionProvider", {}]]}))
    code, text = _cli("sweep", model, "--data", data, "--r", "50%,10", "--n", "1,2", "--method", "tggbc,random",
                      "--out", out, "--device", "local", "--device", board, *FAST)
    assert code == 0, text
    again = _files(out)
    assert {f: again[f] for f in first} == first                      # finished settings untouched
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").iterdir()}
    assert len(results) == 1 + 2 * 2 * 2                               # baseline + methods x r x n
    new = [r for k, r in results.items() if f"results/{k}.json" not in first]
    assert {r["device"] for r in new} == {"local", "local-b"}          # both boards took settings

    table = json.loads((out / "table.json").read_text())
    assert [row["setting"] for row in table["rows"]] == [s.id for s in build_grid(
        ["tggbc", "random"], [24, 10], [1, 2], [0], ["fp32"])]
    assert (out / "table.md").read_text().count("\n") == len(table["rows"]) + 2
    assert (out / "table.csv").read_text().count("\n") == len(table["rows"]) + 1
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    best = next(r for r in table["rows"] if r["setting"] == table["recommended"])
    assert best["map_drop_points"] <= 1.0
    assert best["speedup"] == max(r["speedup"] for r in table["rows"] if r["within_budget"])
    # the recorded accuracy is the stored model's, evaluated independently of the sweep
    pruned = results["tggbc-r10-n2-k0-fp32"]
    assert evaluate_model(out / pruned["model"], data).mean_ap == pytest.approx(pruned["mAP"], abs=1e-9)
    assert results["none-fp32"]["mAP"] == pytest.approx(evaluate_model(model, data).mean_ap, abs=1e-9)


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_the_same_command_finishes(tiny, tmp_path: Path) -> None:
    """SIGTERM while a setting is timed: exit 143 (no abort from ORT sessions freed at exit), only
    finished settings have results, no temporary files; the same command then runs the rest."""
    import os
    import signal
    import subprocess
    import sys

    model, data = tiny
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "edgeprune", "sweep", str(model), "--data", str(data), "--r", "50%", "--n", "1",
            "--out", str(out), "--repeats", "200", "--time-budget", "3", "--warmup", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "timing 2 model(s)" in line:                # the baseline is done, the pruned setting is being timed
            proc.send_signal(signal.SIGTERM)
            break
    text = proc.stdout.read()
    assert proc.wait(timeout=120) == 143, text
    assert sorted(p.name for p in (out / "results").iterdir()) == ["none-fp32.json"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    done = (out / "results" / "none-fp32.json").stat().st_mtime_ns
    finished = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr and "1 of 2 settings already finished" in finished.stderr
    assert (out / "results" / "none-fp32.json").stat().st_mtime_ns == done
    assert (out / "results" / "tggbc-r24-n1-k0-fp32.json").is_file()


def _decoder() -> Path:
    return hd.exported("mha", "torchscript", True)                     # 50 keys, 3 layers, 20 queries


@pytest.mark.parametrize("argv, message", [
    (["--method", "tggbc,nope"], "--method nope: unknown; available: tggbc, tome, random"),
    (["--r", ""], "--r '': give a comma-separated list"),
    (["--n", "1,,2"], "--n '1,,2': give a comma-separated list"),
    (["--r", "150%"], "--r: 150% must be a share of the keys"),
    (["--r", "50"], "--r 50 is not smaller than the model's 50 keys"),
    (["--n", "3"], "--n 3: pruning after layer 3 feeds no later layer"),
    (["--k", "21"], "k=21 exceeds the number of queries (20)"),
    (["--precision", "int8"], "--precision int8: unknown; available: fp32, fp16"),
    (["--max-map-drop", "-1"], "--max-map-drop and --seed must be >= 0"),
    (["--device", "local", "--device", "local"], "--device local is given twice"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv: list[str], message: str, tmp_path: Path) -> None:
    base = {"--r": "10", "--n": "1", "--k": "all"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base.pop(flag, None)
    args = [a for kv in base.items() for a in kv] + argv
    code, text = _cli("sweep", _decoder(), "--data", tmp_path / "none", "--out", tmp_path / "out", *args)
    assert code == 2 and message in text, text
    assert len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_directory_of_a_sweep(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, text = _cli("sweep", _decoder(), "--data", tmp_path, "--r", "10", "--out", tmp_path / "file")
    assert code == 2 and "is a file; give a directory" in text
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, text = _cli("sweep", _decoder(), "--data", tmp_path, "--r", "10", "--out", tmp_path / "other")
    assert code == 2 and "non-empty directory without sweep.json" in text
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_a_decoder_only_model_is_refused_before_any_rewrite(tmp_path: Path) -> None:
    generate_dataset(str(tmp_path / "data"), 1, 1, (64, 32))
    code, text = _cli("sweep", _decoder(), "--data", tmp_path / "data", "--r", "10", "--out", tmp_path / "out")
    assert code == 2 and "no 'images'" in text and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the grid and the front
def test_grid_has_the_baselines_first_and_k_for_tggbc_only() -> None:
    grid = build_grid(["tggbc", "tome", "random"], [10, 20], [1], [0, 5], ["fp32", "fp16"], seed=3)
    assert grid[:2] == [Setting("none", precision="fp32"), Setting("none", precision="fp16")]
    ids = [s.id for s in grid]
    assert len(ids) == len(set(ids)) == 2 + (2 * 2 + 2 + 2) * 2
    assert "tggbc-r10-n1-k5-fp16" in ids and "tome-r20-n1-fp32" in ids and "random-r10-n1-s3-fp32" in ids


def test_pareto_front() -> None:
    # (latency, mAP): b is slower and worse than a; d ties a on latency but is more accurate
    points = [(10.0, 0.5), (12.0, 0.4), (8.0, 0.3), (10.0, 0.6)]
    assert pareto_front(points) == [False, False, True, True]
