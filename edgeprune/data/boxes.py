"""3D boxes in the ego/lidar frame, and the box code the detectors regress.

A box is nuScenes' convention: ``center (x, y, z)`` in metres (x forward, y left, z up),
``size (w, l, h)`` with ``l`` along the heading and ``w`` across it, ``yaw`` the heading
angle about +z (0 = facing +x). Boxes of one sample live in :class:`Boxes`, a frozen set
of arrays, so that metrics, decoding and rendering stay vectorised.

Box code (``all_bbox_preds[..., :10]``), as :class:`edgeprune.models.decoder.PETRHead`
produces it: the head adds the first three regression outputs to the inverse-sigmoid
reference point and applies a sigmoid, so channels 0-2 are the centre normalised to the
point-cloud range; the other seven are raw::

    0 cx   1 cy   2 cz      (x - lo) / (hi - lo) per axis, in [0, 1]
    3 log w   4 log l   5 log h
    6 sin yaw   7 cos yaw
    8 vx   9 vy            (m/s; the synthetic scenes are static, so 0)

(PETR's mmdet3d code orders them cx, cy, w, l, cz, h, ...; edgeprune's head keeps the
sigmoid channels contiguous, and this module is the one place that states the layout.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgeprune.errors import ParameterError

CODE_SIZE = 10


def _f64(values: object, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(shape)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Boxes:
    """``N`` boxes of one sample: centers [N, 3], sizes [N, 3] (w, l, h), yaws [N], labels [N]
    (class indices), scores [N] (1 for ground truth), velocities [N, 2]."""

    centers: np.ndarray
    sizes: np.ndarray
    yaws: np.ndarray
    labels: np.ndarray
    scores: np.ndarray = field(default=None)       # type: ignore[assignment]
    velocities: np.ndarray = field(default=None)   # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = int(np.asarray(self.yaws).size)
        object.__setattr__(self, "centers", _f64(self.centers, (n, 3)))
        object.__setattr__(self, "sizes", _f64(self.sizes, (n, 3)))
        object.__setattr__(self, "yaws", _f64(self.yaws, (n,)))
        labels = np.asarray(self.labels, dtype=np.int64).reshape(n)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "scores", _f64(np.ones(n) if self.scores is None else self.scores, (n,)))
        vel = np.zeros((n, 2)) if self.velocities is None else self.velocities
        object.__setattr__(self, "velocities", _f64(vel, (n, 2)))

    def __len__(self) -> int:
        return int(self.yaws.size)

    @classmethod
    def empty(cls) -> "Boxes":
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, dtype=np.int64))

    def select(self, index: np.ndarray | Sequence[int]) -> "Boxes":
        """The boxes at ``index`` (indices or a boolean mask), in that order."""
        i = np.asarray(index)
        return Boxes(self.centers[i], self.sizes[i], self.yaws[i], self.labels[i], self.scores[i], self.velocities[i])


def corners(boxes: Boxes) -> np.ndarray:
    """Corners ``[N, 8, 3]``: index bits (x, y, z) = (+l/2 if bit0, +w/2 if bit1, +h/2 if bit2)."""
    bits = np.array([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.float64)
    local = (bits - 0.5)[None] * boxes.sizes[:, None, [1, 0, 2]]          # [N, 8, 3] (l, w, h) axes
    c, s = np.cos(boxes.yaws)[:, None], np.sin(boxes.yaws)[:, None]
    x = c * local[..., 0] - s * local[..., 1]
    y = s * local[..., 0] + c * local[..., 1]
    return np.stack([x, y, local[..., 2]], axis=-1) + boxes.centers[:, None, :]


def _range_arrays(pc_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(pc_range) != 6:
        raise ParameterError(f"a point-cloud range has 6 numbers (x0, y0, z0, x1, y1, z1); got {list(pc_range)}")
    lo, hi = np.asarray(pc_range[:3], dtype=np.float64), np.asarray(pc_range[3:], dtype=np.float64)
    return lo, hi


def encode(boxes: Boxes, pc_range: Sequence[float]) -> np.ndarray:
    """Boxes -> box code ``[N, 10]`` (the regression target a trainer compares against)."""
    lo, hi = _range_arrays(pc_range)
    centre = (boxes.centers - lo) / (hi - lo)
    return np.concatenate([centre, np.log(boxes.sizes), np.sin(boxes.yaws)[:, None],
                           np.cos(boxes.yaws)[:, None], boxes.velocities], axis=1)


def decode(code: np.ndarray, labels: np.ndarray, scores: np.ndarray, pc_range: Sequence[float]) -> Boxes:
    """Box code ``[N, >=10]`` (+ labels, scores [N]) -> Boxes in metres."""
    if code.ndim != 2 or code.shape[1] < CODE_SIZE:
        raise ParameterError(f"box code must be [N, >= {CODE_SIZE}]; got {list(code.shape)}")
    lo, hi = _range_arrays(pc_range)
    code = code.astype(np.float64)
    centers = lo + code[:, 0:3] * (hi - lo)
    sizes = np.exp(np.clip(code[:, 3:6], -10.0, 10.0))
    yaws = np.arctan2(code[:, 6], code[:, 7])
    return Boxes(centers, sizes, yaws, labels, scores, code[:, 8:10])
