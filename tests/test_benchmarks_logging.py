"""The benchmark scripts' logging: every line once, and no root-logger chatter (ONNX Runtime's
quantizer logs one root INFO line per unquantized tensor with the module-level
``logging.info``, which configures the root logger on first use when it has no handler)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest


def test_each_line_once_and_root_info_silent(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _common
    from edgeprune.cli.main import log as edgeprune_log
    from edgeprune.cli.main import setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])                 # as in a script, not under pytest
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(edgeprune_log, "handlers", [])
    for name in ("a_benchmark", "benchmarks"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [])
        monkeypatch.setattr(logger, "propagate", True)
        monkeypatch.setattr(logger, "level", logging.NOTSET)
    _common.setup_logging("a_benchmark")
    setup_logging(False)                           # an edgeprune command run in-process sets up its own again
    _common.setup_logging("a_benchmark")           # and a second call adds nothing
    logging.info('Quantization parameters for tensor:"x" not specified')      # ORT, before anything else
    logging.getLogger("a_benchmark").info("script line")
    logging.getLogger("benchmarks").info("common line")
    logging.getLogger("edgeprune.sweep").info("edgeprune line")
    err = capfd.readouterr().err
    for line in ("script line", "common line", "edgeprune line"):
        assert err.count(line) == 1, err
    assert "Quantization parameters" not in err
