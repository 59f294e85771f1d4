"""Named sets of ONNX op types, one home for every "which ops does a walk pass through" list.

Each set answers a different question, so they differ on purpose:

- :data:`RESHAPE_OPS`: the output is input 0's data in the same order, only the shape differs
  (an output of one may be re-anchored or aliased without changing any value);
- :data:`STACK_VIEWS`: what exporters put between a per-layer tensor and the Concat that
  stacks all layers (``all_cls_scores = Concat(Unsqueeze(l0), Unsqueeze(l1), ...)``);
- :data:`LAYOUT_OPS`: a tensor seen through a change of layout or type (Transpose, Cast,
  Expand) still is the same tensor for structural questions (is this input the memory?);
- :data:`PASS_THROUGH_OPS`: matchers walking from an attention node up to its projection pass
  through these (they move, view or re-type input 0).
"""
from __future__ import annotations

ALIAS_OPS = frozenset({"Identity"})
RESHAPE_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
STACK_VIEWS = ("Unsqueeze", "Reshape", "Identity")
LAYOUT_OPS = RESHAPE_OPS | {"Transpose", "Cast", "Expand"}
PASS_THROUGH_OPS = LAYOUT_OPS | {"Dropout", "Split", "Slice", "Contiguous"}
# Elementwise ops a matcher walks through when exactly one input is constant (scale, bias).
AFFINE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
# Ops whose output is not a function of their inputs: never constant-folded.
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})
# Ops of an already quantized model (QDQ, QOperator, dynamic; before and after ORT's fusions):
# int8 refuses to quantize such a model again, bench labels it int8.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})
