"""Query-axis labels: how one tensor axis is composed of query ranges and other entries.

A label says how an axis is composed::

    AxisLabel(pre=1, segments=((0, 900), 768), post=2)   # axis of size 1 * (900 + 768) * 2

``segments`` lists, in order, ranges of ORIGINAL query indices ``(start, stop)`` and blocks
of ``n`` non-query entries (ints); ``pre``/``post`` are factors folded into the axis by a
reshape (``[Nq, B*h, d]``, ``[Nq*B, E]``). Given the kept indices, every label knows its new
size and which old positions survive, so constants can be sliced and shapes rewritten.
Pure data and arithmetic: no graph here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from edgeprune.errors import PatternNotFoundError

Segment = tuple[int, int] | int       # (start, stop) query range, or a block of non-query entries


class QueryAxisError(PatternNotFoundError):
    """The query axis cannot be followed through the graph (ambiguous or unsupported)."""


def _normalize(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """Merge adjacent query ranges and adjacent non-query blocks; drop empty pieces."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, tuple):
            if seg[1] <= seg[0]:
                continue
            if out and isinstance(out[-1], tuple) and out[-1][1] == seg[0]:
                out[-1] = (out[-1][0], seg[1])
                continue
        else:
            if seg <= 0:
                continue
            if out and not isinstance(out[-1], tuple):
                out[-1] = out[-1] + seg
                continue
        out.append(seg)
    return tuple(out)


def _seg_size(seg: Segment) -> int:
    return seg[1] - seg[0] if isinstance(seg, tuple) else seg


@dataclass(frozen=True)
class AxisLabel:
    """Composition of one axis: ``pre`` x (segments laid end to end) x ``post``."""

    segments: tuple[Segment, ...]
    pre: int = 1
    post: int = 1

    @staticmethod
    def make(segments: Iterable[Segment], pre: int = 1, post: int = 1) -> AxisLabel | None:
        """A normalized label, or None when no segment runs over queries."""
        segs = _normalize(segments)
        if not any(isinstance(s, tuple) for s in segs):
            return None
        return AxisLabel(segs, pre, post)

    @property
    def inner(self) -> int:
        return sum(_seg_size(s) for s in self.segments)

    @property
    def size(self) -> int:
        return self.pre * self.inner * self.post

    def inner_positions(self, kept: np.ndarray) -> np.ndarray:
        """Positions within the segment block that survive (ascending)."""
        parts, offset = [], 0
        for seg in self.segments:
            if isinstance(seg, tuple):
                sel = kept[(kept >= seg[0]) & (kept < seg[1])] - seg[0]
                parts.append(sel + offset)
            else:
                parts.append(np.arange(seg) + offset)
            offset += _seg_size(seg)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def positions(self, kept: np.ndarray) -> np.ndarray:
        """Old indices along the whole axis that survive, ascending: [pre * inner' * post]."""
        inner = self.inner_positions(kept)
        grid = (np.arange(self.pre)[:, None, None] * self.inner + inner[None, :, None]) * self.post
        return (grid + np.arange(self.post)[None, None, :]).reshape(-1)

    def resized(self, kept: np.ndarray) -> int:
        return self.pre * len(self.inner_positions(kept)) * self.post

    def sub(self, start: int, stop: int) -> AxisLabel | None:
        """The label of entries ``[start, stop)`` of this axis (no folded factors allowed)."""
        if self.pre != 1 or self.post != 1:
            raise QueryAxisError(f"cannot slice a query axis folded with other dimensions ({self})")
        pieces: list[Segment] = []
        offset = 0
        for seg in self.segments:
            n = _seg_size(seg)
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                pieces.append((seg[0] + lo, seg[0] + hi) if isinstance(seg, tuple) else hi - lo)
            offset += n
        return AxisLabel.make(pieces)

    def __str__(self) -> str:
        segs = "+".join(f"q[{s[0]}:{s[1]}]" if isinstance(s, tuple) else str(s) for s in self.segments)
        return "*".join(p for p in (str(self.pre) if self.pre > 1 else "", f"({segs})",
                                    str(self.post) if self.post > 1 else "") if p)


def concat_labels(parts: Sequence[tuple[AxisLabel | None, int]]) -> AxisLabel | None:
    """Label of a concatenation of (label or None for non-query, size) pieces."""
    segs: list[Segment] = []
    for label, size in parts:
        if label is None:
            segs.append(size)
        elif label.pre != 1 or label.post != 1:
            raise QueryAxisError(f"cannot concatenate a query axis folded with other dimensions ({label})")
        else:
            segs.extend(label.segments)
    return AxisLabel.make(segs)
