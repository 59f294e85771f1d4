"""ONNX graph passes: decoder discovery, the passes themselves, the registry and the driver.

Pipeline of ``edgeprune rewrite`` (``driver.rewrite``)::

    load -> each pass's prepare -> discover (discovery/: metadata or matching, + --override)
    -> check each pass's required decoder parts -> apply passes to one WorkingModel
    (registry: --method, then --precision) -> cleanup + toposort + one export
    (onnx-graphsurgeon) -> onnx.checker -> ORT load -> verify drift (verify) -> atomic save
    -> RewriteReport

Top level: ``driver``, ``registry`` (``--method``/``--precision`` -> pass class), ``verify``.
Subpackages, by what a newcomer looks for: ``discovery/`` (finding the decoder),
``keys/`` (tgGBC and ToMe, sharing ``keys.feed``), ``queries/`` (GPQ), ``precision/``
(fp16). Graph helpers live in ``edgeprune.graph``; reporting (inspect) in ``edgeprune.report``.

Nothing here imports onnx or torch at import time.
"""
