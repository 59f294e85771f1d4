"""Decoder discovery: which tensors of a graph are each layer's attention, keys, values, logits.

``discover`` reads the exporter's record or matches the graph (``attention``: attention
patterns; ``normalize``: undoing onnxsim's merged projections first), applies ``overrides``
given by the user, and returns the immutable records of ``structure`` that passes consume.
"""
