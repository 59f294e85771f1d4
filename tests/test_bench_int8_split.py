"""benchmarks/bench_int8_decoder.py's time split and Amdahl bound, on per-node rows as the agent reports them."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_int8_decoder
    yield bench_int8_decoder
    del sys.modules["bench_int8_decoder"]


def rows(*nodes: tuple[str, str, float]) -> list[dict]:
    return [{"op_type": op, "node": name, "provider": "CPUExecutionProvider", "dur_us": ms * 1000.0}
            for op, name, ms in nodes]


def test_split_groups_weight_gemms_attention_and_the_rest(bench) -> None:
    weights = frozenset({"proj"})
    fp32 = bench.time_split(rows(("Gemm", "ffn", 60.0), ("MatMul", "proj", 20.0), ("MatMul", "pv", 50.0),
                                 ("Softmax", "sm", 30.0), ("Add", "res", 40.0)), weights)
    assert fp32 == {"weight GEMMs": 80.0, "attention + Softmax": 80.0, "other": 40.0}
    fused = bench.time_split(rows(("FusedMatMul", "proj/MatMulScaleFusion/", 5.0),
                                  ("FusedMatMul", "qk/MatMulScaleFusion/", 7.0)), weights)
    assert fused == {"weight GEMMs": 5.0, "attention + Softmax": 7.0, "other": 0.0}
    int8 = bench.time_split(rows(("DynamicQuantizeMatMul", "ffn_q", 15.0), ("QuantizeLinear", "q", 5.0),
                                 ("MatMul", "pv", 50.0), ("Softmax", "sm", 30.0), ("Add", "res", 40.0)), weights)
    assert int8["weight GEMMs"] == 20.0
    bound = bench.amdahl(fp32, int8)
    assert bound["gemm_speedup"] == pytest.approx(4.0)
    assert bound["bound_free_gemms"] == pytest.approx(200.0 / 120.0)     # the float 120 ms remain
    assert bound["float_share"] == pytest.approx(0.4)


def test_weight_matmuls_are_those_with_a_constant_b(bench, tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
         helper.make_node("MatMul", ["y", "x"], ["z"], name="act")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])], [w])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert bench.weight_matmuls(tmp_path / "m.onnx") == {"proj"}
