"""Synthetic scenes: the rig's projection, visibility per camera, determinism, the on-disk
format round trip, the box code, and the ``dataset synth`` command."""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest

from edgeprune.cli.main import main
from edgeprune.data import boxes as box_code
from edgeprune.data.boxes import Boxes
from edgeprune.data.format import load_dataset, write_dataset
from edgeprune.data.render import Rig, render_scene
from edgeprune.data.synth import CLASS_NAMES, GROUND_Z, generate_dataset, sample_scene

SIZE = (128, 64)


def _camera_axes(yaw_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Position, forward, left, up of a ring camera, written from the rig's description."""
    yaw = math.radians(yaw_deg)
    pos = np.array([0.8 * math.cos(yaw), 0.8 * math.sin(yaw), -0.3])
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    left = np.array([-math.sin(yaw), math.cos(yaw), 0.0])
    return pos, forward, left, np.array([0.0, 0.0, 1.0])


@pytest.mark.parametrize("cam,yaw_deg", list(enumerate((0.0, -60.0, 60.0, 180.0, 120.0, -120.0))))
def test_projection_matches_hand_computed_pixel(cam: int, yaw_deg: float) -> None:
    rig = Rig.for_image_size((704, 256))
    pos, fwd, left, up = _camera_axes(yaw_deg)
    point = pos + 10.0 * fwd + 1.0 * left + 0.5 * up        # 1 m left, 0.5 m up, 10 m ahead
    f = 1266.4 / 1600.0 * 704
    expected = np.array([352.0 - f * 1.0 / 10.0, 128.0 - f * 0.5 / 10.0])
    got = rig.project(rig.to_camera(point, cam))
    np.testing.assert_allclose(got, expected, atol=1e-9)
    assert rig.to_camera(point, cam)[2] == pytest.approx(10.0)


def _one_car_ahead_of(cam: int, yaw_deg: float) -> Boxes:
    pos, fwd, _, _ = _camera_axes(yaw_deg)
    centre = pos + 12.0 * fwd
    return Boxes([[centre[0], centre[1], GROUND_Z + 0.8]], [[1.9, 4.5, 1.6]], [0.4], [0])


@pytest.mark.parametrize("cam,yaw_deg", list(enumerate((0.0, -60.0, 60.0, 180.0, 120.0, -120.0))))
def test_object_in_front_of_camera_is_visible_there(cam: int, yaw_deg: float) -> None:
    rig = Rig.for_image_size(SIZE)
    boxes = _one_car_ahead_of(cam, yaw_deg)
    _, look, _ = sample_scene(0, 0)
    look = type(look)(**{**look.__dict__, "colors": np.array([[255.0, 0.0, 0.0]]), "noise_std": 0.0})
    images, visible = render_scene(rig, boxes, look, np.random.default_rng(0))
    empty, _ = render_scene(rig, Boxes.empty(), look, np.random.default_rng(0))
    assert visible.shape == (1, 6)
    assert visible[0, cam] == visible[0].max() > 100
    changed = np.any(images != empty, axis=-1).sum(axis=(1, 2))          # [6] pixels the car changed
    assert changed[cam] == visible[0, cam]
    centre_px = rig.project(rig.to_camera(boxes.centers[0], cam)).astype(int)
    assert np.any(images[cam, centre_px[1], centre_px[0]] != empty[cam, centre_px[1], centre_px[0]])
    assert visible[0, _opposite(cam)] == 0


def _opposite(cam: int) -> int:
    """The camera looking the other way (yaw + 180 deg)."""
    return {0: 3, 3: 0, 1: 4, 4: 1, 2: 5, 5: 2}[cam]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_dataset(str(tmp_path / "a"), 2, 7, SIZE)
    b = generate_dataset(str(tmp_path / "b"), 2, 7, SIZE)
    c = generate_dataset(str(tmp_path / "c"), 2, 8, SIZE)
    assert _digest(a.root) == _digest(b.root)
    assert len(_digest(a.root)) == 3
    diff_c = _digest(c.root)
    assert all(diff_c[k] != v for k, v in _digest(a.root).items())
    short = generate_dataset(str(tmp_path / "short"), 1, 7, SIZE)       # scene 0 independent of the count
    assert _digest(short.root)["images/000000.npy"] == _digest(a.root)["images/000000.npy"]


def test_dataset_round_trips_through_loader(tmp_path: Path) -> None:
    ds = generate_dataset(str(tmp_path / "d"), 2, 3, SIZE)
    boxes, look, rng = sample_scene(3, 1)
    images, visible = render_scene(Rig.for_image_size(SIZE), boxes, look, rng)
    loaded = load_dataset(tmp_path / "d")
    assert ds.meta.classes == loaded.meta.classes == CLASS_NAMES
    np.testing.assert_array_equal(loaded.images(1), images)
    scene = loaded.scenes[1]
    np.testing.assert_allclose(scene.boxes.centers, boxes.centers)
    np.testing.assert_allclose(scene.boxes.sizes, boxes.sizes)
    np.testing.assert_allclose(scene.boxes.yaws, boxes.yaws)
    np.testing.assert_array_equal(scene.boxes.labels, boxes.labels)
    np.testing.assert_array_equal(scene.visible_pixels, visible)
    np.testing.assert_allclose(loaded.meta.intrinsics, Rig.for_image_size(SIZE).intrinsics)
    gt = loaded.ground_truth(1, min_visible_pixels=1)
    assert len(gt) == int(np.count_nonzero(visible.sum(1) >= 1))


def test_write_is_atomic_on_failure(tmp_path: Path) -> None:
    def scenes():
        yield "000000", np.zeros((6, 64, 128, 3), np.uint8), Boxes.empty(), np.zeros((0, 6))
        raise RuntimeError("interrupted")

    meta = load_dataset(generate_dataset(str(tmp_path / "ok"), 1, 0, SIZE).root).meta
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "broken", meta, scenes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_box_code_round_trip() -> None:
    rng = np.random.default_rng(0)
    boxes = Boxes(rng.uniform(-30, 30, (5, 3)) * [1, 1, 0.2], rng.uniform(0.3, 5, (5, 3)), rng.uniform(-3.1, 3.1, 5),
                  rng.integers(0, 4, 5), velocities=rng.normal(size=(5, 2)))
    pc_range = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    code = box_code.encode(boxes, pc_range)
    back = box_code.decode(code, boxes.labels, boxes.scores, pc_range)
    assert code.shape == (5, 10) and np.all((code[:, :3] > 0) & (code[:, :3] < 1))
    for name in ("centers", "sizes", "yaws", "velocities"):
        np.testing.assert_allclose(getattr(back, name), getattr(boxes, name), atol=1e-9)


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue() + err.getvalue()


def test_cli_synth_and_errors(tmp_path: Path) -> None:
    code, text = _cli("dataset", "synth", "-o", str(tmp_path / "s"), "--scenes", "1", "--image-size", "128x64")
    assert code == 0 and "1 scenes" in text
    assert len(load_dataset(tmp_path / "s")) == 1
    code, text = _cli("dataset", "synth", "-o", str(tmp_path / "s"), "--scenes", "1")
    assert code == 2 and "--overwrite" in text and len(text.strip().splitlines()) == 1
    code, text = _cli("dataset", "synth", "-o", str(tmp_path / "t"), "--image-size", "100x64")
    assert code == 2 and "multiples of 32" in text and not (tmp_path / "t").exists()
