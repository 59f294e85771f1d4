"""benchmarks/bench_int8_decoder.py's time split and Amdahl bound, on per-node rows as the agent reports them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeprune.runners.profile import aggregate


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_int8_decoder
    yield bench_int8_decoder
    del sys.modules["bench_int8_decoder"]


def rows(**ms: float) -> list[dict]:
    return [{"op_type": op, "node": f"{op}_{i}", "provider": "CPUExecutionProvider", "dur_us": v * 1000.0}
            for i, (op, v) in enumerate(ms.items())]


def test_split_groups_weight_gemms_attention_and_the_rest(bench) -> None:
    fp32 = bench.time_split(aggregate(rows(Gemm=60.0, FusedGemm=20.0, MatMul=50.0, Softmax=30.0, Add=40.0)))
    assert fp32 == {"weight GEMMs": 80.0, "attention + Softmax": 80.0, "other": 40.0}
    int8 = bench.time_split(aggregate(rows(DynamicQuantizeMatMul=15.0, QuantizeLinear=5.0, FusedMatMul=50.0,
                                           Softmax=30.0, Add=40.0)))
    assert int8["weight GEMMs"] == 20.0
    bound = bench.amdahl(fp32, int8)
    assert bound["gemm_speedup"] == pytest.approx(4.0)
    assert bound["bound_free_gemms"] == pytest.approx(200.0 / 120.0)     # the float 120 ms remain
    assert bound["float_share"] == pytest.approx(0.4)
