"""Exception types.

User errors (bad input, missing files, unreachable boards) derive from :class:`UserError`
and are printed by the CLI as one line with exit code 2. Our own bugs raise
:class:`InternalError` so they are never mistaken for a user's mistake.
"""
from __future__ import annotations


class EdgepruneError(Exception):
    """Base of every error edgeprune raises on purpose."""


class UserError(EdgepruneError):
    """The input is wrong; the message says what was asked, what exists and how to fix it."""


class ModelNotFoundError(UserError):
    """Unknown preset or missing model file."""


class CheckpointError(UserError):
    """A checkpoint does not match the model (missing or unexpected keys, shapes)."""


class OutputPathError(UserError):
    """The output file cannot be written."""


class InputFileError(UserError):
    """An input path is not a regular file (FIFO, device, directory) or is implausibly large."""


class InvalidModelError(UserError):
    """An ONNX file is corrupt, or a graph lacks the structure a pass needs."""


class PatternNotFoundError(InvalidModelError):
    """A graph pass could not find the part of the decoder it needs."""


class ParameterError(UserError):
    """A numeric parameter is out of range (r, n, k, batch, repeats ...)."""


class DependencyError(UserError):
    """An optional dependency is missing; the message names the extra to install."""


class DeviceError(UserError):
    """A board cannot be reached, authenticated against, or lacks what a run needs."""


class ValidationError(EdgepruneError):
    """An exported or rewritten model does not compute what its reference computes."""


class InternalError(EdgepruneError):
    """A bug in edgeprune; please report it with the traceback (run with -v)."""
