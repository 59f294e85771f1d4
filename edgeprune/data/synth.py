"""Sampling of synthetic scenes: a few object classes on the ground around the ego car.

Every scene ``i`` of a dataset with seed ``S`` draws from its own generator
``numpy.random.default_rng([S, i])``, so a scene does not depend on how many scenes are
generated, and the same seed gives the same bytes. Classes carry nuScenes' detection names
(so nuScenes' per-class rules apply: barrier headings are compared modulo 180 degrees,
traffic-cone headings not at all) and differ in size, height and colour::

    class          size w x l x h (m)   colour (RGB)     share
    car            1.9 x 4.5 x 1.6      blue              40 %
    pedestrian     0.6 x 0.7 x 1.75     magenta           25 %
    traffic_cone   0.4 x 0.4 x 0.8      orange            20 %
    barrier        2.4 x 0.5 x 1.0      yellow            15 %   (long side across the heading)

Sizes vary by +-10 % per axis and colours by +-20 per channel; objects stand on the ground
(``GROUND_Z`` = -1.84 m in the lidar frame, nuScenes' lidar height), 4 to 35 m from the ego
centre, any heading, without overlapping footprints.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprune.data.boxes import Boxes
from edgeprune.data.format import SynthDataset
from edgeprune.data.render import Look

GROUND_Z = -1.84
MIN_RANGE_M, MAX_RANGE_M = 4.0, 35.0
OBJECTS_PER_SCENE = (4, 12)          # inclusive
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class ObjectClass:
    name: str
    size: tuple[float, float, float]      # mean (w, l, h), metres
    color: tuple[int, int, int]
    share: float


CLASSES = (
    ObjectClass("car", (1.9, 4.5, 1.6), (60, 90, 210), 0.40),
    ObjectClass("pedestrian", (0.6, 0.7, 1.75), (200, 50, 170), 0.25),
    ObjectClass("traffic_cone", (0.4, 0.4, 0.8), (255, 120, 20), 0.20),
    ObjectClass("barrier", (2.4, 0.5, 1.0), (235, 225, 60), 0.15),
)
CLASS_NAMES = tuple(c.name for c in CLASSES)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a dataset with ``seed`` (independent of the scene count)."""
    return np.random.default_rng([seed, index])


def _place(rng: np.random.Generator, radius: float, taken: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """A ground position ``(x, y)`` whose footprint circle clears every taken one, or None."""
    for _ in range(_PLACEMENT_TRIES):
        r = rng.uniform(MIN_RANGE_M, MAX_RANGE_M)
        a = rng.uniform(-np.pi, np.pi)
        x, y = r * np.cos(a), r * np.sin(a)
        if all(np.hypot(x - tx, y - ty) > radius + tr + 0.3 for tx, ty, tr in taken):
            return float(x), float(y)
    return None


def sample_boxes(rng: np.random.Generator) -> tuple[Boxes, np.ndarray]:
    """-> (the scene's boxes, their RGB colours ``[N, 3]``)."""
    count = int(rng.integers(OBJECTS_PER_SCENE[0], OBJECTS_PER_SCENE[1] + 1))
    shares = np.array([c.share for c in CLASSES])
    labels = rng.choice(len(CLASSES), size=count, p=shares / shares.sum())
    centers, sizes, yaws, kept, colors = [], [], [], [], []
    taken: list[tuple[float, float, float]] = []
    for label in labels:
        cls = CLASSES[int(label)]
        size = np.array(cls.size) * rng.uniform(0.9, 1.1, 3)
        radius = 0.5 * float(np.hypot(size[0], size[1]))
        spot = _place(rng, radius, taken)
        if spot is None:
            continue
        taken.append((spot[0], spot[1], radius))
        centers.append([spot[0], spot[1], GROUND_Z + size[2] / 2])
        sizes.append(size)
        yaws.append(rng.uniform(-np.pi, np.pi))
        kept.append(int(label))
        colors.append(np.clip(np.array(cls.color) + rng.uniform(-20, 20, 3), 0, 255))
    if not kept:
        return Boxes.empty(), np.zeros((0, 3))
    return Boxes(np.array(centers), np.array(sizes), np.array(yaws), np.array(kept)), np.array(colors)


def sample_look(rng: np.random.Generator, colors: np.ndarray) -> Look:
    """Sun, ground, sky and noise of one scene (lighting varies between scenes)."""
    elevation = rng.uniform(0.3, 1.2)
    azimuth = rng.uniform(-np.pi, np.pi)
    sun = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation)])
    grey = rng.uniform(90, 130)
    return Look(colors=colors, sun=sun, ground_z=GROUND_Z,
                ground_color=np.array([grey, grey * 0.97, grey * 0.9]) + rng.uniform(-8, 8, 3),
                texture_offset=rng.uniform(0, 4, 2),
                sky_horizon=np.array([200.0, 215.0, 230.0]) + rng.uniform(-15, 15, 3),
                sky_zenith=np.array([70.0, 120.0, 200.0]) + rng.uniform(-15, 15, 3),
                noise_std=float(rng.uniform(2.0, 5.0)))


def sample_scene(seed: int, index: int) -> tuple[Boxes, Look, np.random.Generator]:
    """Boxes and look of scene ``index``; the returned generator then draws the image noise."""
    rng = scene_rng(seed, index)
    boxes, colors = sample_boxes(rng)
    return boxes, sample_look(rng, colors), rng


def parse_image_size(text: str) -> tuple[int, int]:
    """``"352x128"`` -> (352, 128); whole-model export needs multiples of 32."""
    from edgeprune.errors import ParameterError
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ParameterError(f"image size {text!r} is not WxH (e.g. 352x128)") from None
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise ParameterError(f"image size {w}x{h} must be positive multiples of 32 in both sides "
                             "(what whole-model export needs), e.g. 352x128 or 704x256")
    return w, h


def generate_dataset(out: str, scenes: int, seed: int, image_size: tuple[int, int],
                     overwrite: bool = False, progress=None) -> SynthDataset:
    """Sample and render ``scenes`` scenes into a dataset directory ``out`` (see ``format``)."""
    from edgeprune.data import format as fmt
    from edgeprune.data.render import Rig, render_scene
    from edgeprune.errors import ParameterError
    from edgeprune.models import position

    if scenes < 1:
        raise ParameterError(f"--scenes must be >= 1 (got {scenes})")
    fmt.check_output_dir(out, overwrite)
    rig = Rig.for_image_size(image_size)
    meta = fmt.DatasetMeta(seed, image_size, position.CAMERA_NAMES, CLASS_NAMES, position.POINT_CLOUD_RANGE,
                           GROUND_Z, rig.intrinsics, rig.cam2lidar)

    def rendered():
        for i in range(scenes):
            boxes, look, rng = sample_scene(seed, i)
            images, visible = render_scene(rig, boxes, look, rng)
            yield f"{i:06d}", images, boxes, visible
            if progress is not None:
                progress(i + 1, scenes)

    fmt.write_dataset(out, meta, rendered(), overwrite)
    return fmt.load_dataset(out)
