"""PyTorch reference implementations of the pruning methods (tgGBC keys, GPQ queries).

They are the public API for users working in torch and the oracles every ONNX graph pass
is tested against. Semantics follow ``shared/docs/methods.md`` exactly.
"""
