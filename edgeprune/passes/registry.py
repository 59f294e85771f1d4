"""The registry of graph passes: what ``edgeprune rewrite --method`` and ``--precision`` offer.

A pass is a class with

- ``name`` (the ``--method`` value) and ``help`` (one line for ``--help``);
- ``requires``: the decoder parts it needs from discovery, a subset of
  ``{"probs", "key", "value", "mask", "logits"}`` (the driver checks them and names the
  ``--override`` that supplies a missing one before the pass runs);
- ``add_arguments(group)`` (classmethod): its own command-line options. Options several
  passes share are defined once, by the CLI (``edgeprune.cli.args``: ``--r``/``--n``/``--k``
  of the key-reducing passes, with ``default=None`` so ``from_args`` sees what was given); a
  pass reads them from ``args`` and must not define them again (argparse refuses a
  duplicate flag when the parser is built). Validate in ``from_args``;
- ``from_args(args)`` (classmethod): an instance from parsed arguments (raise ParameterError
  for out-of-range values);
- ``apply(working, structure) -> None``: the rewrite, on a ``graph.edit.WorkingModel``: edit
  ``working.graph()`` (onnx-graphsurgeon) in place, or build a new ModelProto from
  ``working.proto()`` and hand it to ``working.replace``. The driver cleans up and exports
  once after the last pass. A pass must not keep matches on ``self``;
- ``prepare(model) -> onnx.ModelProto`` (optional, BasePass: no-op): normalizations the pass
  needs before discovery runs, e.g. ``normalize.split_shared_projections`` (undo onnxsim's
  merging of all layers' key projections into one MatMul + Split). The structure the pass
  receives describes the prepared graph.

Adding a pass = one new module defining the class + one line in :data:`METHODS` (or
:data:`PRECISIONS` for a number-format conversion, applied after the method). Pass modules are
imported when the CLI builds its parser, so they must not import onnx/torch at module level.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any, ClassVar, Protocol, Sequence

from edgeprune.errors import InternalError, ParameterError

# --method NAME -> "module:Class". Order is the order shown in --help.
METHODS: dict[str, str] = {
    "tggbc": "edgeprune.passes.keys.tggbc:KeyPruningPass",
    "gpq": "edgeprune.passes.queries.gpq:QueryPruningPass",
    "tome": "edgeprune.passes.keys.tome:TokenMergingPass",
    "random": "edgeprune.passes.keys.random_keys:RandomPruningPass",
    "none": "edgeprune.passes.registry:IdentityPass",
}
# --precision NAME -> "module:Class" (fp32 is the absence of a conversion). Precision passes
# must also be constructible without arguments (``rewrite(..., precision="fp16")``).
PRECISIONS: dict[str, str] = {
    "fp16": "edgeprune.passes.precision.fp16:Fp16Pass",
    "int8": "edgeprune.passes.precision.int8:Int8Pass",
    "int8-dynamic": "edgeprune.passes.precision.int8:Int8DynamicPass",
}


class Pass(Protocol):
    """What the driver and the CLI need from a pass (see the module docstring)."""

    name: ClassVar[str]
    help: ClassVar[str]
    requires: ClassVar[frozenset[str]]

    @classmethod
    def add_arguments(cls, group: Any) -> None: ...

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Pass: ...

    def apply(self, working: Any, structure: Any) -> None: ...

    def prepare(self, model: Any) -> Any: ...


class BasePass:
    """Defaults for a pass without options; subclasses set ``name``/``help``/``requires``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False     # a precision pass that cannot run without calibration data

    @classmethod
    def add_arguments(cls, group: Any) -> None:
        """No options."""

    @classmethod
    def from_args(cls, args: argparse.Namespace | None) -> BasePass:
        return cls()

    def apply(self, working: Any, structure: Any) -> None:
        raise NotImplementedError

    def prepare(self, model: Any) -> Any:
        """No normalization needed."""
        return model

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityPass(BasePass):
    """Changes nothing: the driver still cleans up, checks, verifies and saves (and converts
    precision when asked), so ``--method none --precision fp16`` converts alone."""

    name = "none"
    help = "no graph change (use with --precision fp16, or to check and re-save a model)"

    def apply(self, working: Any, structure: Any) -> None:
        """Nothing to edit."""


def _load(spec: str) -> type:
    module, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise InternalError(f"pass {spec!r} is registered but cannot be loaded ({exc})") from exc


def method_names() -> list[str]:
    """``--method`` choices."""
    return list(METHODS)


def precision_names(calibrated: bool = True) -> list[str]:
    """``--precision`` choices (fp32 = no conversion); ``calibrated=False`` leaves out those that
    need calibration data (static int8), for commands that have none to give (``sweep``)."""
    return ["fp32"] + [n for n in PRECISIONS if calibrated or not get_precision(n).needs_calibration]


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ParameterError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return _load(METHODS[name])


def get_precision(name: str) -> type | None:
    """The conversion pass for ``name``, or None for fp32."""
    if name == "fp32":
        return None
    if name not in PRECISIONS:
        raise ParameterError(f"unknown precision {name!r}; available: {', '.join(precision_names())}")
    return _load(PRECISIONS[name])


def add_pass_arguments(parser: argparse.ArgumentParser, names: Sequence[str] = ()) -> None:
    """Each registered pass's options, in an argument group per pass."""
    names = list(names) or method_names() + list(PRECISIONS)
    for name in names:
        cls = get_method(name) if name in METHODS else get_precision(name)
        if cls is None:
            continue
        group = parser.add_argument_group(f"{name} options", cls.help)
        cls.add_arguments(group)


def build_passes(args: argparse.Namespace) -> list[Any]:
    """Instances for ``args.method`` (and ``args.precision`` conversion options, if any)."""
    return [get_method(args.method).from_args(args)]
