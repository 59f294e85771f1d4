"""ONNX graph passes: decoder discovery, the pass registry and the rewrite driver.

Pipeline of ``edgeprune rewrite`` (``driver.rewrite``)::

    load -> discover (discovery: metadata or matching, + --override) -> check each pass's
    required decoder parts -> apply passes (registry: --method, then --precision) ->
    cleanup + toposort (onnx-graphsurgeon) -> onnx.checker -> ORT load -> verify drift
    (verify) -> atomic save -> RewriteReport

Modules: ``structure`` (the records discovery returns; the contract passes read),
``discovery``, ``attention_match`` (attention patterns), ``matching`` (GraphIndex,
``match_parent_path``), ``shapes`` (static shape inference), ``overrides``, ``registry``,
``driver``, ``verify``, ``flops``, and one module per pass. Shared by the key-reducing
passes (tgGBC, ToMe): ``graph_edit`` (adding named nodes with onnx-graphsurgeon) and
``key_feed`` (feeding later layers the reduced keys, their ``--r``/``--n``); GPQ's inputs
(keep-index files, calibration, one-shot ranking): ``gpq_inputs``.

Nothing here imports onnx or torch at import time.
"""
