"""The main job (`edgeprune demo`) end to end on a small configuration."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from edgeprune.cli.main import main


@pytest.mark.slow
def test_demo_builds_every_variant_and_prints_one_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--model", "streampetr-r50-704x256-light", "--layers", "2", "--r", "2000",
                 "--k", "175", "--keep-queries", "100", "--warmup", "1", "--repeats", "3", "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in table[2:]}
    assert list(rows) == ["baseline", "tggbc", "gpq", "baseline-fp16", "tggbc-fp16"]
    assert "1.00x (baseline)" in rows["baseline"] and "vs torch max|d|=" in rows["baseline"]
    for name in ("tggbc", "gpq", "baseline-fp16", "tggbc-fp16"):
        assert "x [" in rows[name]                                 # a speedup with its interval
    files = {p.name for p in out.iterdir()}
    assert files == {"decoder.onnx", "decoder_tggbc.onnx", "decoder_gpq.onnx", "decoder_fp16.onnx",
                     "decoder_tggbc_fp16.onnx"}
    gpq = onnx.load(str(out / "decoder_gpq.onnx"), load_external_data=False)
    cls = next(o for o in gpq.graph.output if o.name == "all_cls_scores")
    assert [d.dim_value for d in cls.type.tensor_type.shape.dim][2] == 100
    tggbc = onnx.load(str(out / "decoder_tggbc.onnx"), load_external_data=False)
    assert sum(n.op_type == "TopK" for n in tggbc.graph.node) == 2       # k>0: top queries + top keys
