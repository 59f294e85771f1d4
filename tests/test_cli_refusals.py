"""Requests edgeprune cannot honour are errors naming what would work, never a wrong result with
exit 0: mismatching --inputs, NaN data, a pruning schedule past the last layer, a profile
without a transport, speedups between unrelated models, options a method ignores, pruning twice."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import handwritten_decoder as hd
from _runner_models import matmul_chain
from test_io_policy import one_line, run_cli, snapshot


pytestmark = pytest.mark.usefixtures("no_user_profiles")


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The hand-written 3-layer decoder (50 keys, 20 queries) and two unrelated tiny models."""
    d = tmp_path / "w"
    d.mkdir()
    shutil.copy(hd.exported("mha", "torchscript", True), d / "d.onnx")       # the export the tgGBC tests share
    matmul_chain(d / "m.onnx", 8, batch=1)
    matmul_chain(d / "n.onnx", 8, batch=1, seed=1)
    monkeypatch.chdir(d)
    return d


def refused(capsys, work: Path, *argv: str) -> str:
    """Run the CLI; assert exit 2, one line on stderr, nothing on stdout, no file changed or left."""
    before = snapshot(work)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "", err
    assert snapshot(work) == before
    return one_line(err)


def test_inputs_that_do_not_match_the_model_list_the_mismatches(work, capsys):
    feeds = hd.HandDecoder("mha", hd.Dims()).example_inputs(1)
    arrays = {k: v.numpy() for k, v in feeds.items()}
    name, first = next(iter(arrays.items()))
    np.savez(work / "wrong.npz", **dict(arrays, **{name: first[..., :-1]}), extra=np.zeros(2))
    line = refused(capsys, work, "rewrite", "d.onnx", "-o", "o.onnx", "--inputs", "wrong.npz")
    assert "--inputs does not match the model's inputs" in line
    assert f"{name} {list(first[..., :-1].shape)} (model: {list(first.shape)})" in line
    assert "extra is not a model input" in line
    np.savez(work / "right.npz", **arrays)
    code, out, err = run_cli(capsys, "rewrite", "d.onnx", "-o", "o.onnx", "--inputs", "right.npz")
    assert code == 0 and "drift against the input model, inputs given:" in out, err


@pytest.mark.parametrize("command", [["inspect", "d.onnx"], ["rewrite", "d.onnx", "-o", "o.onnx", "--method", "tggbc"]])
def test_pruning_after_the_last_layer_names_the_valid_range(work, capsys, command):
    line = refused(capsys, work, *command, "--r", "10", "--n", "3")
    assert "n=3 equals the number of decoder layers" in line and "n must be in [1, 2] for this model" in line


def test_tome_has_the_same_range(work, capsys):
    line = refused(capsys, work, "rewrite", "d.onnx", "-o", "o.onnx", "--method", "tome", "--r", "10", "--n", "3")
    assert "n must be in [1, 2] for this model" in line


def test_a_one_layer_decoder_cannot_prune(tmp_path, capsys, monkeypatch):
    module = hd.HandDecoder("mha", hd.Dims(layers=1))
    hd.export(module, tmp_path / "one.onnx", "torchscript", module.example_inputs(1))
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, "rewrite", "one.onnx", "-o", "o.onnx", "--method", "tggbc", "--r", "10")
    assert "this model has 1 decoder layer: nothing can be pruned (use r=0)" in line


def test_key_counts_with_a_method_that_ignores_them(work, capsys):
    line = refused(capsys, work, "rewrite", "d.onnx", "-o", "o.onnx", "--method", "gpq", "--r", "10",
                   "--keep-queries", "5", "--calib", "x.npz")
    assert line.endswith("--r 10 has no effect with --method gpq; key counts are for --method tggbc / tome / random")


def test_pruning_a_pruned_model_is_refused(work, capsys):
    code, _, err = run_cli(capsys, "rewrite", "d.onnx", "-o", "p.onnx", "--method", "tggbc", "--r", "10", "--n", "1")
    assert code == 0, err
    line = refused(capsys, work, "rewrite", "p.onnx", "-o", "pp.onnx", "--method", "tggbc", "--r", "10", "--n", "1")
    assert "p.onnx is already key-reduced (tggbc); reducing it again is not supported" in line
    code, _, err = run_cli(capsys, "rewrite", "p.onnx", "-o", "p16.onnx", "--precision", "fp16", "--no-verify")
    assert code == 0, err                            # other passes on a pruned model still work


def test_profile_without_transport(work, capsys):
    (work / "board.json").write_text(json.dumps({"host": "192.168.1.50", "user": "orangepi"}))
    line = refused(capsys, work, "bench", "m.onnx", "--device", "board.json")
    assert "device profile board.json: has no 'transport'; add \"transport\": \"ssh\"" in line


def test_profile_top_must_be_positive(work, capsys):
    assert "--profile-top must be >= 1 (got -1)" in refused(capsys, work, "bench", "m.onnx", "--profile-top", "-1")


def test_no_speedup_between_models_whose_inputs_differ(work, capsys):
    (work / "x.onnx").write_bytes((work / "d.onnx").read_bytes())
    argv = ["bench", "m.onnx", "d.onnx", "--warmup", "0", "--repeats", "3", "--threads", "1", "--json", "r.json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "no speedup for d against m: their inputs differ" in err and "--compare-anyway" in err
    assert json.loads((work / "r.json").read_text())["speedups"] == []
    row = next(line for line in out.splitlines() if line.startswith("d "))
    assert row.rstrip().endswith("inputs differ")
    code, out, err = run_cli(capsys, *argv, "--compare-anyway")
    assert code == 0 and len(json.loads((work / "r.json").read_text())["speedups"]) == 1
    code, out, err = run_cli(capsys, "bench", "m.onnx", "n.onnx", "--warmup", "0", "--repeats", "3")
    assert code == 0 and "inputs differ" not in out + err            # variants of one model: a ratio
