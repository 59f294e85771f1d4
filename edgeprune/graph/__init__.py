"""The ONNX graph toolkit every other part builds on; it knows nothing about decoders.

- ``ops``: named sets of op types (which ops a walk passes through, and why);
- ``values``: node attributes, constant values, exact byte counts;
- ``shapes``: static shapes and element types (ONNX inference on a weight-free copy);
- ``index``: :class:`GraphIndex` (producers, consumers, constants by dict) and the matcher walks;
- ``edit``: onnx-graphsurgeon editing (:class:`GraphEditor`, :class:`WorkingModel`), header copy, cleanup;
- ``files``: loading with one-line errors, and the one saver with the one protobuf size rule.
"""
