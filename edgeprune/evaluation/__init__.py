"""Accuracy of ONNX detectors: decoding their outputs, nuScenes detection metrics, running a
model over a dataset (``eval``), and comparing two models (``compare``).

``metrics`` is pure numpy (a port of nuscenes-devkit's detection algorithms, cross-checked
against the devkit when it is installed); the rest needs onnxruntime.
"""
