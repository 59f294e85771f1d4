"""A synthetic dataset directory -> shuffled training batches (normalised images + targets).

Images are held in memory as uint8 (a 1600-scene split at 352x128 is 1.3 GB) and normalised
per batch with :func:`edgeprune.data.format.model_images`, the same step ``edgeprune eval``
applies, so training and evaluation see identical inputs. Targets are the boxes ``eval``
counts as ground truth (at least ``MIN_VISIBLE_PIXELS`` visible), in the head's box code.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from edgeprune.data import boxes as box_code
from edgeprune.data.boxes import Boxes
from edgeprune.data.render import Rig
from edgeprune.data.format import SynthDataset, load_dataset, model_images
from edgeprune.errors import ParameterError
from edgeprune.evaluation.evaluate import MIN_VISIBLE_PIXELS
from edgeprune.training.dense import TokenTargets, token_targets
from edgeprune.training.losses import Target


class TrainingSet:
    """All scenes of a dataset directory, ready to batch."""

    def __init__(self, path: str | os.PathLike, image_size: tuple[int, int], limit: int | None = None) -> None:
        self.dataset: SynthDataset = load_dataset(path)
        if tuple(self.dataset.meta.image_size) != tuple(image_size):
            w, h = image_size
            raise ParameterError(f"{path} has images of {self.dataset.meta.image_size[0]}x"
                                 f"{self.dataset.meta.image_size[1]}, the model takes {w}x{h}; "
                                 f"generate it with edgeprune dataset synth --image-size {w}x{h}")
        count = len(self.dataset) if limit is None else min(limit, len(self.dataset))
        if count < 1:
            raise ParameterError(f"{path} holds no scenes; generate some with edgeprune dataset synth")
        self.images = np.stack([self.dataset.images(i) for i in range(count)])   # uint8 [S, 6, H, W, 3]
        ground_truth = [self.dataset.ground_truth(i, MIN_VISIBLE_PIXELS) for i in range(count)]
        self.targets = [self._target(gt) for gt in ground_truth]
        rig = Rig(self.dataset.meta.intrinsics, self.dataset.meta.cam2lidar, tuple(self.dataset.meta.image_size))
        self.token_targets: list[TokenTargets] = [token_targets(gt, rig) for gt in ground_truth]

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def pc_range(self) -> tuple[float, ...]:
        return tuple(self.dataset.meta.point_cloud_range)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.dataset.meta.classes)

    def _target(self, gt: Boxes) -> Target:
        code = box_code.encode(gt, self.dataset.meta.point_cloud_range)
        return Target(torch.from_numpy(gt.labels.copy()), torch.from_numpy(code).float())

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, list[Target], list[TokenTargets]]:
        """-> (images float32 ``[b, 6, 3, H, W]``, their box targets, their token targets)."""
        images = torch.from_numpy(model_images(self.images[indices]))
        return (images, [self.targets[int(i)] for i in indices],
                [self.token_targets[int(i)] for i in indices])


def epoch_order(num_scenes: int, seed: int, epoch: int) -> np.ndarray:
    """Scene order of ``epoch``: a permutation that depends only on (seed, epoch), so a resumed run replays it."""
    return np.random.default_rng([seed, epoch]).permutation(num_scenes)


def batch_indices(num_scenes: int, batch: int, seed: int, start_step: int) -> Iterator[np.ndarray]:
    """Endless batches of scene indices from step ``start_step`` on (incomplete epoch tails dropped)."""
    per_epoch = max(num_scenes // batch, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(num_scenes, seed, epoch)
        yield order[offset * batch:(offset + 1) * batch]
        step += 1
