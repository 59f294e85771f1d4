"""The benchmark scripts' logging: every line once, and no root-logger chatter (ONNX Runtime's
quantizer logs one root INFO line per unquantized tensor)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest


def test_each_line_once_and_root_info_silent(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _common
    from edgeprune.cli.main import setup_logging

    script = logging.getLogger("a_benchmark")
    monkeypatch.setattr(script, "handlers", [])
    monkeypatch.setattr(script, "propagate", True)
    monkeypatch.setattr(logging.getLogger("benchmarks"), "handlers", [])
    _common.setup_logging("a_benchmark")
    setup_logging(False)                           # an edgeprune command run in-process sets up its own again
    _common.setup_logging("a_benchmark")           # and a second call adds nothing
    script.info("script line")
    logging.getLogger("benchmarks").info("common line")
    logging.getLogger("edgeprune.sweep").info("edgeprune line")
    logging.info('Quantization parameters for tensor:"x" not specified')
    err = capfd.readouterr().err
    for line in ("script line", "common line", "edgeprune line"):
        assert err.count(line) == 1, err
    assert "Quantization parameters" not in err
