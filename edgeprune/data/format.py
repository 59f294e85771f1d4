"""The on-disk format of a synthetic dataset, its loader, and the images -> model-input step.

A dataset is a directory::

    DIR/dataset.json          annotations and the rig (below)
    DIR/images/000000.npy     uint8 [6, H, W, 3] RGB, cameras in CAMERA_NAMES order
    DIR/images/000001.npy     ...

``dataset.json``::

    {"format": "edgeprune-synth/1",
     "seed": 0, "image_size": [W, H],
     "cameras": ["CAM_FRONT", "CAM_FRONT_RIGHT", ...],
     "classes": ["car", "pedestrian", "traffic_cone", "barrier"],
     "point_cloud_range": [-61.2, -61.2, -10.0, 61.2, 61.2, 10.0],
     "ground_z": -1.84,
     "intrinsics": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],       # every camera
     "cam2lidar": [[[4 x 4]], ...],                             # per camera, camera -> lidar
     "scenes": [{"token": "000000", "images": "images/000000.npy",
                 "boxes": [{"class": "car", "center": [x, y, z], "size": [w, l, h],
                            "yaw": 0.3, "velocity": [0.0, 0.0],
                            "visible_pixels": [0, 812, 0, 0, 0, 0]}, ...]}, ...]}

Frames: the ego/lidar frame (x forward, y left, z up, metres); ``size`` is nuScenes' ``wlh``
(``l`` along the heading); ``yaw`` in radians about +z; ``visible_pixels`` counts the pixels
of each camera the box owns after occlusion. Images are ``.npy`` (not compressed ``.npz``,
whose zip headers carry timestamps) so that a seed gives identical bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from edgeprune.data.boxes import Boxes
from edgeprune.errors import OutputPathError, UserError

FORMAT = "edgeprune-synth/1"
INDEX = "dataset.json"
# ImageNet statistics, as PETR's pipelines normalise: (rgb / 255 - mean) / std.
PIXEL_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
PIXEL_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class DatasetError(UserError):
    """A dataset directory is missing, incomplete or of another format."""


@dataclass(frozen=True)
class DatasetMeta:
    seed: int
    image_size: tuple[int, int]            # (W, H)
    cameras: tuple[str, ...]
    classes: tuple[str, ...]
    point_cloud_range: tuple[float, ...]
    ground_z: float
    intrinsics: np.ndarray                 # [3, 3]
    cam2lidar: np.ndarray                  # [6, 4, 4]


@dataclass(frozen=True)
class Scene:
    token: str
    images: str                            # path relative to the dataset directory
    boxes: Boxes
    visible_pixels: np.ndarray             # [N, 6]


@dataclass(frozen=True)
class SynthDataset:
    root: Path
    meta: DatasetMeta
    scenes: tuple[Scene, ...]

    def __len__(self) -> int:
        return len(self.scenes)

    def images(self, index: int) -> np.ndarray:
        """uint8 RGB ``[6, H, W, 3]`` of scene ``index``."""
        path = self.root / self.scenes[index].images
        if not path.is_file():
            raise DatasetError(f"{path} is missing from dataset {self.root}; regenerate it with edgeprune dataset synth")
        return np.load(path, allow_pickle=False)

    def ground_truth(self, index: int, min_visible_pixels: int = 1) -> Boxes:
        """Boxes of scene ``index`` seen by at least ``min_visible_pixels`` pixels in all cameras."""
        scene = self.scenes[index]
        return scene.boxes.select(scene.visible_pixels.sum(axis=1) >= min_visible_pixels)


def model_images(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B, 6, H, W, 3]`` -> float32 ``[B, 6, 3, H, W]`` normalised, what ``images`` inputs take."""
    x = (images.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))


# ----------------------------------------------------------------------------- write
def _box_json(boxes: Boxes, classes: tuple[str, ...], visible: np.ndarray) -> list[dict]:
    return [{"class": classes[int(boxes.labels[i])], "center": [float(v) for v in boxes.centers[i]],
             "size": [float(v) for v in boxes.sizes[i]], "yaw": float(boxes.yaws[i]),
             "velocity": [float(v) for v in boxes.velocities[i]],
             "visible_pixels": [int(v) for v in visible[i]]} for i in range(len(boxes))]


def _meta_json(meta: DatasetMeta) -> dict:
    return {"format": FORMAT, "seed": meta.seed, "image_size": list(meta.image_size),
            "cameras": list(meta.cameras), "classes": list(meta.classes),
            "point_cloud_range": list(meta.point_cloud_range), "ground_z": meta.ground_z,
            "intrinsics": meta.intrinsics.tolist(), "cam2lidar": meta.cam2lidar.tolist()}


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work when ``path`` cannot become the dataset directory."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"-o {target} is a file; give a directory for the dataset")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise OutputPathError(f"-o {target} already exists and is not empty; remove it, choose another -o, "
                              "or pass --overwrite")
    parent = target.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot create {target}: directory {parent} does not exist or is not writable")
    return target


def write_dataset(path: str | os.PathLike, meta: DatasetMeta,
                  scenes: Iterable[tuple[str, np.ndarray, Boxes, np.ndarray]], overwrite: bool = False) -> Path:
    """Write ``(token, images uint8 [6, H, W, 3], boxes, visible [N, 6])`` scenes to ``path``.

    Everything goes to a hidden staging directory beside ``path`` first and is renamed into
    place at the end, so an interrupted run leaves no partial dataset.
    """
    target = check_output_dir(path, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())          # mkdtemp makes 0700; a dataset is shared like any output
        (staging / "images").mkdir()
        records = []
        for token, images, boxes, visible in scenes:
            rel = f"images/{token}.npy"
            np.save(staging / rel, np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
            records.append({"token": token, "images": rel, "boxes": _box_json(boxes, meta.classes, visible)})
        index = dict(_meta_json(meta), scenes=records)
        (staging / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_dir(staging: Path, target: Path) -> None:
    """Rename ``staging`` onto ``target``; an existing target is moved aside first, then removed."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    os.rename(target, old / "data")
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ read
def _read_index(root: Path) -> dict:
    index = root / INDEX
    if not index.is_file():
        raise DatasetError(f"{root} is not a dataset: {INDEX} is missing; create one with "
                           f"edgeprune dataset synth -o {root}")
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {index} ({exc})") from exc
    if data.get("format") != FORMAT:
        raise DatasetError(f"{index} has format {data.get('format')!r}; this edgeprune reads {FORMAT!r}")
    return data


def _scene(record: dict, classes: tuple[str, ...], num_cameras: int) -> Scene:
    boxes = record["boxes"]
    unknown = {b["class"] for b in boxes} - set(classes)
    if unknown:
        raise DatasetError(f"scene {record['token']} has classes {sorted(unknown)} not in the dataset's {list(classes)}")
    parsed = Boxes(np.array([b["center"] for b in boxes]).reshape(-1, 3), np.array([b["size"] for b in boxes]).reshape(-1, 3),
                   np.array([b["yaw"] for b in boxes]), np.array([classes.index(b["class"]) for b in boxes]),
                   velocities=np.array([b["velocity"] for b in boxes]).reshape(-1, 2))
    visible = np.array([b["visible_pixels"] for b in boxes], dtype=np.int64).reshape(-1, num_cameras)
    return Scene(record["token"], record["images"], parsed, visible)


def load_dataset(path: str | os.PathLike) -> SynthDataset:
    """Read ``DIR/dataset.json`` (images are loaded per scene by :meth:`SynthDataset.images`)."""
    root = Path(path)
    data = _read_index(root)
    try:
        classes = tuple(data["classes"])
        meta = DatasetMeta(int(data["seed"]), tuple(data["image_size"]), tuple(data["cameras"]), classes,
                           tuple(data["point_cloud_range"]), float(data["ground_z"]),
                           np.array(data["intrinsics"], dtype=np.float64), np.array(data["cam2lidar"], dtype=np.float64))
        scenes = tuple(_scene(r, classes, len(meta.cameras)) for r in data["scenes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{root / INDEX} is malformed ({type(exc).__name__}: {exc}); regenerate it") from exc
    return SynthDataset(root, meta, scenes)


def batches(dataset: SynthDataset, batch: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """Scene indices and uint8 images ``[b, 6, H, W, 3]`` in batches of up to ``batch``."""
    for start in range(0, len(dataset), batch):
        idx = list(range(start, min(start + batch, len(dataset))))
        yield idx, np.stack([dataset.images(i) for i in idx])
