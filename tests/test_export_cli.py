"""``edgeprune export`` end to end: the acceptance exports (real presets, each exported once per
module), flags, and bad input (one-line error, exit code 2, no output file)."""
from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgeprune.cli.main import main
from edgeprune.export.decoder_map import missing_tensors, read_decoder_map
from edgeprune.export.validate import ort_session
from edgeprune.models.build import build_model
from edgeprune.models.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
PASS_LINE = "max abs <= 0.0001: PASS"


@dataclass(frozen=True)
class CliRun:
    code: int
    stdout: str
    path: Path
    seconds: float


def _export(tmp: Path, *args: str) -> CliRun:
    out = tmp / "model.onnx"
    buf = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        code = main(["export", *args, "-o", str(out)])
    return CliRun(code, buf.getvalue(), out, time.perf_counter() - started)


@pytest.fixture(scope="module")
def streampetr_torchscript(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    return _export(tmp_path_factory.mktemp("ts"), "--model", "streampetr-r50-704x256", "--scope", "decoder")


@pytest.fixture(scope="module")
def streampetr_dynamo(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    return _export(tmp_path_factory.mktemp("dyn"), "--model", "streampetr-r50-704x256", "--scope", "decoder",
                   "--exporter", "dynamo")


@pytest.fixture(scope="module")
def focalpetr_full(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    return _export(tmp_path_factory.mktemp("full"), "--model", "focalpetr-r18-704x256", "--scope", "full")


def _check_valid_file(run: CliRun, inputs: list[str], layers: int, queries: int, keys: int) -> onnx.ModelProto:
    """Exit 0 after a passing report; onnx.checker passes; ORT loads; the map is consistent."""
    assert run.code == 0 and PASS_LINE in run.stdout, run.stdout
    onnx.checker.check_model(str(run.path), full_check=True)
    session = ort_session(run.path)
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == ["all_cls_scores", "all_bbox_preds"]
    saved = onnx.load(str(run.path))
    dmap = read_decoder_map(saved)
    assert (dmap.num_layers, dmap.num_queries, dmap.num_keys) == (layers, queries, keys)
    assert dmap.probs_present and missing_tensors(saved, dmap) == []
    return saved


STREAM_INPUTS = ["memory", "key_pos", "prev_query", "prev_ref", "temp_memory", "temp_pos"]


@pytest.mark.slow
def test_streampetr_decoder_torchscript(streampetr_torchscript: CliRun) -> None:
    saved = _check_valid_file(streampetr_torchscript, STREAM_INPUTS, 6, 900, 4224)
    assert read_decoder_map(saved).num_learned_queries == 644
    # Independent of the CLI's own report: ORT vs a freshly built torch model, new inputs.
    model = build_model("streampetr-r50-704x256", "decoder", seed=0)
    inputs = model.example_inputs(batch=1, seed=11)
    with torch.no_grad():
        expected = [t.numpy() for t in model(*inputs.values())]
    got = ort_session(streampetr_torchscript.path).run(None, {k: v.numpy() for k, v in inputs.items()})
    for e, g in zip(expected, got):
        assert e.shape == g.shape and np.abs(e - g).max() <= 1e-4


@pytest.mark.slow
def test_streampetr_decoder_dynamo(streampetr_dynamo: CliRun) -> None:
    saved = _check_valid_file(streampetr_dynamo, STREAM_INPUTS, 6, 900, 4224)
    assert read_decoder_map(saved).exporter == "dynamo"
    assert {o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")} == {18}


@pytest.mark.slow
def test_full_model_resnet18(focalpetr_full: CliRun) -> None:
    saved = _check_valid_file(focalpetr_full, ["images"], 6, 900, 4224)
    dmap = read_decoder_map(saved)
    assert dmap.scope == "full" and dmap.memory.shape == (1, 4224, 256) and dmap.key_pos.shape == (1, 4224, 256)
    assert dmap.memory.name not in dmap.inputs
    assert any(node.op_type == "Conv" for node in saved.graph.node)


@pytest.mark.slow
def test_flags_batch_attention_layers_no_simplify_no_validate(tmp_path: Path) -> None:
    run = _export(tmp_path, "--model", "focalpetr-r18-704x256", "--layers", "1", "--attention", "torch",
                  "--batch", "2", "--no-simplify", "--no-validate", "--seed", "5")
    assert run.code == 0 and "validation against torch skipped" in run.stdout
    saved = onnx.load(str(run.path))
    dmap = read_decoder_map(saved)
    assert (dmap.num_layers, dmap.batch, dmap.attention) == (1, 2, "torch")
    assert dmap.layers[0].probs_layout == "(BH)QK" and dmap.layers[0].cross_attn_probs.shape == (16, 900, 4224)
    assert [d.dim_value for d in saved.graph.input[0].type.tensor_type.shape.dim] == [2, 4224, 256]


@pytest.mark.slow
def test_failed_validation_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    run = _export(tmp_path, "--model", "focalpetr-r18-704x256", "--layers", "1", "--tolerance", "1e-12")
    assert run.code == 1
    rows = {line.split()[0]: line.split()[-1] for line in run.stdout.splitlines()[1:3]}
    assert rows == {"all_cls_scores": "FAIL", "all_bbox_preds": "FAIL"}
    assert list(tmp_path.iterdir()) == []


def test_list_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith("full export:")}
    assert set(rows) == set(PRESETS)
    assert rows["streampetr-r50-704x256"][3:] == ["704x256", "4224", "644+256", "yes"]
    assert rows["petr-vov-1600x640"][-1] == "no" and rows["open-r101-1408x512"][-1] == "yes"


@pytest.fixture
def wrong_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "other.pt"
    torch.save({"backbone.conv1.weight": torch.zeros(1), "head.bogus": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("args, fragment", [
    (["--model", "no-such-model"], "unknown model preset 'no-such-model'; available: petr-r50-1408x512"),
    (["--model", "petr-r50-800x320", "--batch", "0"], "batch must be an integer >= 1"),
    (["--model", "petr-r50-800x320", "--exporter", "dynamo", "--opset", "17"], "needs opset >= 18"),
    (["--model", "petr-vov-1600x640", "--scope", "full"], "VoVNet is not implemented"),
    (["--model", "petr-r50-800x320", "--checkpoint", "{tmp}/absent.pt"], "does not exist"),
    (["--model", "petr-r50-800x320", "--checkpoint", "{ckpt}"], "missing keys"),
    (["--model", "petr-r50-800x320", "--layers", "0"], "--layers must be >= 1"),
])
def test_bad_input_one_line_exit_2_no_file(tmp_path: Path, wrong_checkpoint: Path, capsys: pytest.CaptureFixture[str],
                                           args: list[str], fragment: str) -> None:
    args = [a.format(tmp=tmp_path, ckpt=wrong_checkpoint) for a in args]
    out = tmp_path / "out.onnx"
    assert main(["export", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("edgeprune export: error: ") and fragment in err[-1]
    assert not any(line.startswith("Traceback") for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_unwritable_output_is_refused_before_building(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.INFO):
        assert main(["export", "--model", "streampetr-r50-704x256", "-o", str(blocker / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
    assert not any(r.getMessage().startswith("building") for r in caplog.records)
    assert sorted(tmp_path.iterdir()) == [blocker]


def test_subprocess_unknown_preset(tmp_path: Path) -> None:
    out = tmp_path / "d.onnx"
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "export", "--model", "streampetr-r99", "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "unknown model preset 'streampetr-r99'" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
