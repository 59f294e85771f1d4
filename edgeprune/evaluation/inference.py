"""Running an ONNX detector over a dataset: feeds built from the scenes' images.

A whole-model export (``edgeprune export --scope full``) takes ``images [B, 6, 3, H, W]``
(normalised as :func:`edgeprune.data.format.model_images` does); StreamPETR exports also
take temporal inputs, which are fed zeros (a first frame: no propagated queries or memory).
Decoder-only exports take image tokens, not images, and cannot be run on a dataset.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import numpy as np

from edgeprune.data.format import SynthDataset, batches, model_images
from edgeprune.errors import InvalidModelError, ParameterError

log = logging.getLogger(__name__)

IMAGES = "images"
OUTPUTS = ("all_cls_scores", "all_bbox_preds")
Progress = Callable[[int, int], None]


def image_input(sess: Any, path: str | os.PathLike) -> tuple[int, tuple[int, ...]]:
    """(batch, shape) of the model's ``images`` input, or a user error saying what to export."""
    by_name = {i.name: i for i in sess.get_inputs()}
    if IMAGES not in by_name:
        raise InvalidModelError(f"{path} has inputs {list(by_name)}, no '{IMAGES}': running it on a dataset needs a "
                                "whole-model export (edgeprune export --scope full ...)")
    shape = tuple(by_name[IMAGES].shape)
    if len(shape) != 5 or not all(isinstance(d, int) for d in shape[1:]):
        raise InvalidModelError(f"input '{IMAGES}' of {path} has shape {list(shape)}; expected [B, 6, 3, H, W]")
    return (shape[0] if isinstance(shape[0], int) else 1), shape


def check_image_size(shape: tuple[int, ...], dataset: SynthDataset, path: str | os.PathLike) -> None:
    w, h = dataset.meta.image_size
    if tuple(shape[1:]) != (len(dataset.meta.cameras), 3, h, w):
        raise ParameterError(f"{path} takes images {list(shape)} but {dataset.root} has {len(dataset.meta.cameras)} "
                             f"cameras at {w}x{h}; generate a matching dataset with edgeprune dataset synth "
                             f"--image-size {shape[4]}x{shape[3]}")


def feeds_for(sess: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """``images`` (float32 ``[B, 6, 3, H, W]``) plus zeros for every other input."""
    feeds = {IMAGES: images}
    for meta in sess.get_inputs():
        if meta.name != IMAGES:
            shape = tuple(d if isinstance(d, int) else images.shape[0] for d in meta.shape)
            feeds[meta.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def dataset_outputs(sess: Any, path: str | os.PathLike, dataset: SynthDataset, limit: int | None = None,
                    progress: Progress | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(scene index, {output: array for that scene, batch axis 1})`` over the dataset."""
    batch, shape = image_input(sess, path)
    check_image_size(shape, dataset, path)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    names = [o.name for o in sess.get_outputs()]
    done = 0
    for idx, images in batches(dataset, batch):
        idx = [i for i in idx if i < total]
        if not idx:
            break
        x = model_images(images[:len(idx)])
        if len(idx) < batch:                                       # a static batch: pad with the last scene
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(idx), axis=0)])
        outputs = dict(zip(names, sess.run(names, feeds_for(sess, x))))
        for j, scene in enumerate(idx):
            yield scene, {n: _batch_item(v, j) for n, v in outputs.items()}
        done += len(idx)
        if progress is not None:
            progress(done, total)


def _batch_item(value: np.ndarray, j: int) -> np.ndarray:
    """Element ``j`` of the batch axis, kept as size 1 (axis 1 for [L, B, ...] outputs, else 0)."""
    axis = 1 if value.ndim == 4 else 0
    return np.take(value, [j], axis=axis)
