"""`edgeprune bench` end to end on this machine, through the real CLI dispatcher."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from _runner_models import matmul_chain
from edgeprune.cli import main as cli_main
from edgeprune.cli.bench_cmd import parse_affinity, parse_providers
from edgeprune.errors import ParameterError


pytestmark = pytest.mark.usefixtures("no_user_profiles")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    paths = {"a": d / "a.onnx", "b": d / "b.onnx", "half": d / "half.onnx"}
    weights = matmul_chain(paths["a"], 32)
    matmul_chain(paths["b"], 8)
    matmul_chain(paths["half"], 16, dtype="float16")
    return paths, weights


def _bench(capsys, *argv):
    code = cli_main.main(["bench", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_two_models_interleaved_with_json_and_csv(models, tmp_path, capsys):
    paths, _ = models
    code, out, err = _bench(capsys, paths["a"], paths["b"], "--free-dim", "batch=4", "--repeats", "9",
                            "--warmup", "1", "--threads", "1", "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"] for m in data["models"]] == ["a", "b"] and data["interleaved"]
    assert [len(m["samples_ms"]) for m in data["models"]] == [9, 9]
    assert data["speedups"][0]["paired"] and data["env"]["threads"] == 1
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + 2 * (1 + 9)
    table = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in ("a", "b")]
    assert table == ["a", "b"]


def test_npz_inputs_and_time_budget(models, tmp_path, capsys):
    paths, weights = models
    x = np.ones((3, 32), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code, _, err = _bench(capsys, paths["a"], "--inputs", tmp_path / "in.npz", "--time-budget", "0.05",
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    m = data["models"][0]
    assert m["inputs"] == {"x": [[3, 32], "float32"]} and len(m["samples_ms"]) >= 3
    assert data["request"]["time_budget_s"] == 0.05 and data["request"]["repeats"] > 10**5


def test_profile_prints_layers(models, capsys):
    paths, _ = models
    code, out, err = _bench(capsys, paths["a"], "--free-dim", "batch=2", "--repeats", "3", "--profile")
    assert code == 0, err
    layer_rows = [line.split()[:2] for line in out.splitlines() if line.strip().startswith("layer ")]
    assert layer_rows == [["layer", "0"], ["layer", "1"]]


def test_already_fp16_model_runs_as_is(models, tmp_path, capsys):
    paths, _ = models
    code, _, err = _bench(capsys, paths["half"], "--precision", "fp16", "--free-dim", "batch=2", "--repeats", "3",
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    (m,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert m["precision"] == "fp16" and m["inputs"]["x"][1] == "float16" and m["source"] is None


def test_precision_both(models, tmp_path, capsys):
    paths, weights = models
    code, out, err = _bench(capsys, paths["a"], "--precision", "both", "--free-dim", "batch=2", "--repeats", "3",
                            "--profile", "--json", tmp_path / "r.json")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert [(m["name"], m["precision"]) for m in data["models"]] == [("a-fp32", "fp32"), ("a-fp16", "fp16")]
    assert data["models"][1]["source"] == str(paths["a"]) and data["speedups"][0]["baseline"] == "a-fp32"
    assert data["models"][1]["inputs"]["x"][1] == "float32"          # converter keeps fp32 I/O
    for m in data["models"]:     # the fp16 copy's graph is read for the profile before it is deleted
        layers = [row["key"] for row in m["profile_summary"]["by_layer"]]
        assert layers[:2] == ["layer 0", "layer 1"]
    assert out.count("profile of a-fp") == 2


@pytest.mark.parametrize("argv, needle", [
    (["{missing}"], "does not exist"),
    (["{a}"], "'batch'"),
    (["{a}", "--free-dim", "batch=2", "--providers", "cuda"], "CUDAExecutionProvider"),
    (["{a}", "--free-dim", "batch"], "KEY=VALUE"),
    (["{a}", "--free-dim", "batch=2", "--affinity", "x-y"], "--affinity"),
    (["{a}", "--free-dim", "batch=2", "--repeats", "0"], "--repeats"),
    (["{half}", "--precision", "both"], "already fp16"),
    (["{half}", "--precision", "fp32"], "already fp16"),
    (["{a}", "--free-dim", "batch=2", "--device", "no-such-board-xyz"], "no-such-board-xyz"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(models, tmp_path, capsys, argv, needle):
    paths, _ = models
    names = {"missing": tmp_path / "nope.onnx", **{k: v for k, v in paths.items()}}
    argv = [a.format(**names) for a in argv] + ["--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    code, _, err = _bench(capsys, *argv)
    assert code == 2 and needle in _one_line_error(err)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.csv").exists()


def test_unwritable_output_fails_before_running(models, tmp_path, capsys):
    paths, _ = models
    code, _, err = _bench(capsys, paths["a"], "--free-dim", "batch=2", "--json", tmp_path / "no" / "r.json")
    assert code == 2 and "does not exist" in _one_line_error(err) and "timing" not in err


def test_parse_providers_and_affinity():
    assert parse_providers("tensorrt,cuda,cpu", ["tensorrt:trt_fp16_enable=1", "trt_max_workspace_size=1024",
                                                 "cuda:device_id=0"]) == (
        ("TensorrtExecutionProvider", {"trt_fp16_enable": "1", "trt_max_workspace_size": "1024"}),
        ("CUDAExecutionProvider", {"device_id": "0"}), ("CPUExecutionProvider", {}))
    assert parse_providers(None, []) is None
    with pytest.raises(ParameterError, match="not in --providers"):
        parse_providers("cpu", ["cuda:device_id=0"])
    assert parse_affinity("4-7,0") == (0, 4, 5, 6, 7) and parse_affinity(None) is None


def test_runs_without_onnx_or_torch(models, tmp_path):
    """The board-side install: numpy + onnxruntime only. onnx/torch/onnxsim imports must fail."""
    import subprocess
    from pathlib import Path

    paths, _ = models
    script = (
        "import sys\n"
        "for m in ('onnx', 'torch', 'onnxsim', 'onnx_graphsurgeon', 'onnxscript'): sys.modules[m] = None\n"
        "from edgeprune.cli import main\n"
        f"code = main.main(['bench', {str(paths['a'])!r}, '--free-dim', 'batch=1', '--repeats', '3',"
        f" '--json', {str(tmp_path / 'r.json')!r}])\n"
        "assert not any(sys.modules.get(m) for m in ('onnx', 'torch')), 'heavy module imported'\n"
        "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1],
                          env={"EDGEPRUNE_CONFIG_DIR": str(tmp_path / "config"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    (m,) = json.loads((tmp_path / "r.json").read_text())["models"]
    assert m["precision"] is None and len(m["samples_ms"]) == 3


def test_device_profile_path_sets_defaults(models, tmp_path, capsys):
    paths, _ = models
    profile = tmp_path / "box.json"
    profile.write_text(json.dumps({"transport": "local", "threads": 1, "providers": [["CPUExecutionProvider", {}]]}))
    code, _, err = _bench(capsys, paths["b"], "--device", profile, "--free-dim", "batch=1", "--repeats", "3",
                          "--json", tmp_path / "r.json")
    assert code == 0, err
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["device"] == "box" and data["env"]["threads"] == 1 and data["request"]["threads"] == 1


def test_precision_detection_agrees_with_the_converter(models, tmp_path):
    import onnx

    from edgeprune.passes.precision.fp16 import convert_fp16, is_fp16
    from edgeprune.runners.precision import model_precision

    paths, _ = models
    converted = tmp_path / "conv.onnx"
    onnx.save(convert_fp16(onnx.load(str(paths["a"]))), str(converted))   # fp32 I/O, fp16 weights
    for path in (paths["a"], paths["half"], converted):
        assert (model_precision(path) == "fp16") == is_fp16(onnx.load(str(path)))
    assert model_precision(converted) == "fp16" and model_precision(paths["a"]) == "fp32"


@pytest.mark.parametrize("n,k", [(1, 0), (2, 10)])
def test_ideal_speedup_of_a_rewritten_model_is_inspects_ratio(n, k, tmp_path, capsys):
    """bench's ideal column (table, JSON, CSV) is `inspect --r/--n/--k`'s ideal speedup of the input."""
    import csv
    import shutil

    import handwritten_decoder as hd

    src = tmp_path / "base.onnx"
    shutil.copyfile(hd.exported("hand", "torchscript", True), src)
    pruned = tmp_path / "pruned.onnx"
    assert cli_main.main(["rewrite", str(src), "-o", str(pruned), "--method", "tggbc", "--r", "30", "--n", str(n),
                          "--k", str(k), "--no-verify"]) == 0
    capsys.readouterr()
    assert cli_main.main(["inspect", str(src), "--r", "30", "--n", str(n), "--k", str(k), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["pruning"]["ideal_speedup"]
    code, out, err = _bench(capsys, src, pruned, "--repeats", "3", "--warmup", "0", "--threads", "1",
                            "--json", tmp_path / "r.json", "--csv", tmp_path / "r.csv")
    assert code == 0, err
    [ideal] = json.loads((tmp_path / "r.json").read_text())["ideal_speedups"]
    assert ideal["ideal"] == pytest.approx(expected, rel=0.01) and ideal["ideal"] > 1.05
    assert ideal["measured_over_ideal"] == pytest.approx(ideal["measured"] / ideal["ideal"])
    row = next(line.split() for line in out.splitlines() if line.startswith("pruned"))
    assert row[-2:] == [f"{ideal['ideal']:.2f}x", f"{ideal['measured_over_ideal']:.2f}"]
    with open(tmp_path / "r.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert float(rows["pruned"]["ideal_speedup"]) == ideal["ideal"] and rows["base"]["ideal_speedup"] == "1.0"


def test_no_ideal_speedup_for_more_than_a_decoder(tmp_path):
    """A graph with a backbone (a Conv, or the exporter's scope "full") gets no FLOPs: only the decoder's are counted."""
    import onnx
    from onnx import TensorProto, helper

    import handwritten_decoder as hd
    from edgeprune.report.describe import decoder_alone, graph_flops

    conv = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "backbone",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])]))
    onnx.save(conv, str(tmp_path / "conv.onnx"))
    assert not decoder_alone(conv) and graph_flops(tmp_path / "conv.onnx") is None
    decoder = hd.exported("hand", "torchscript", True)
    assert decoder_alone(onnx.load(str(decoder))) and graph_flops(decoder) > 0


def test_no_ideal_speedup_for_a_quantized_decoder(tmp_path):
    """An int8 decoder gets no FLOPs: its quantized products are not float MatMuls to count
    (counting what is left gave a static int8 decoder a bogus 2.24x "ideal")."""
    from edgeprune.cli.main import main
    from edgeprune.report.describe import graph_flops

    import handwritten_decoder as hd
    src = hd.exported("hand", "torchscript", True)
    out = tmp_path / "d8.onnx"
    assert main(["rewrite", str(src), "-o", str(out), "--precision", "int8-dynamic", "--no-verify"]) == 0
    assert graph_flops(src) > 0 and graph_flops(out) is None
