"""Numpy rendering of box scenes into the six cameras: projection, clipping, polygon fill.

For each camera the background is ray-cast (textured ground plane below the horizon, a sky
gradient above), then the boxes are drawn far -> near (painter's algorithm): each box's
faces that point at the camera are clipped to the near plane, projected through the rig's
pinhole matrix and filled as convex polygons. Faces are Lambert-shaded by a sun direction;
a box's front face is lighter and its back face darker, so the heading is visible. An id
buffer records which box owns each pixel, giving per-camera visible pixel counts.

Pixel ``(col, row)`` covers ``[col, col+1) x [row, row+1)``; a polygon covers a pixel when
it contains the pixel's centre. Projection (camera frame OpenCV: x right, y down, z
forward)::

    p_cam = inverse(cam2lidar[k]) @ p_lidar        u = fx * x / z + cx,   v = fy * y / z + cy
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprune.data.boxes import Boxes, corners

NEAR_M = 0.1
# Box faces as corner indices (see boxes.corners: bit0 = +x (front), bit1 = +y (left), bit2 = +z (top)),
# ordered around the face, with the outward normal in the box frame. The bottom face lies on
# the ground and is never seen by cameras above it, so it is not drawn.
FACES = ((1, 3, 7, 5), (0, 4, 6, 2), (2, 6, 7, 3), (0, 1, 5, 4), (4, 5, 7, 6))
FACE_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]], dtype=np.float64)
FRONT, BACK = 0, 1


@dataclass(frozen=True)
class Rig:
    """The cameras: one pinhole ``intrinsics [3, 3]`` for all, ``cam2lidar [6, 4, 4]``, ``image_size (W, H)``."""

    intrinsics: np.ndarray
    cam2lidar: np.ndarray
    image_size: tuple[int, int]

    @classmethod
    def for_image_size(cls, image_size: tuple[int, int]) -> "Rig":
        """edgeprune's fixed rig (:mod:`edgeprune.models.position`) at ``image_size``."""
        from edgeprune.models import position   # torch: only needed to generate a dataset
        return cls(position.intrinsics(image_size).numpy(), position.cam2lidar().numpy(), tuple(image_size))

    @property
    def num_cameras(self) -> int:
        return int(self.cam2lidar.shape[0])

    def to_camera(self, points: np.ndarray, cam: int) -> np.ndarray:
        """Lidar-frame points ``[..., 3]`` -> camera-frame points ``[..., 3]`` of camera ``cam``."""
        m = self.cam2lidar[cam]
        return (points - m[:3, 3]) @ m[:3, :3]          # R^T (p - t), written row-wise

    def project(self, points_cam: np.ndarray) -> np.ndarray:
        """Camera-frame points ``[..., 3]`` (z > 0) -> pixel coordinates ``[..., 2]``."""
        k = self.intrinsics
        z = points_cam[..., 2]
        return np.stack([k[0, 0] * points_cam[..., 0] / z + k[0, 2], k[1, 1] * points_cam[..., 1] / z + k[1, 2]], -1)

    def pixel_rays(self, cam: int) -> np.ndarray:
        """Unit ray directions ``[H, W, 3]`` (lidar frame) through the pixel centres of ``cam``."""
        w, h = self.image_size
        u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        pix = np.stack([u, v, np.ones_like(u)], -1)                     # [H, W, 3]
        rays = pix @ np.linalg.inv(self.intrinsics).T @ self.cam2lidar[cam][:3, :3].T
        return rays / np.linalg.norm(rays, axis=-1, keepdims=True)


@dataclass(frozen=True)
class Look:
    """How a scene looks: per-box RGB ``colors [N, 3]`` (0-255), the sun, ground and sky."""

    colors: np.ndarray
    sun: np.ndarray                  # unit vector towards the sun, lidar frame
    ground_z: float
    ground_color: np.ndarray         # [3]
    texture_offset: np.ndarray       # [2] metres: shifts the ground pattern between scenes
    sky_horizon: np.ndarray          # [3]
    sky_zenith: np.ndarray           # [3]
    noise_std: float


def background(rig: Rig, cam: int, look: Look) -> np.ndarray:
    """Float RGB ``[H, W, 3]``: checkered, hazy ground below the horizon, sky gradient above."""
    rays = rig.pixel_rays(cam)                                          # [H, W, 3]
    origin = rig.cam2lidar[cam][:3, 3]
    down = rays[..., 2] < -1e-6
    t = np.where(down, (look.ground_z - origin[2]) / np.where(down, rays[..., 2], -1.0), 0.0)   # 0: sky
    ground = origin[:2] + t[..., None] * rays[..., :2] + look.texture_offset   # [H, W, 2]
    checker = (np.floor(ground[..., 0] / 2.0) + np.floor(ground[..., 1] / 2.0)) % 2
    fine = np.sin(ground[..., 0] * 3.1) * np.sin(ground[..., 1] * 2.3)
    ground_rgb = look.ground_color * (0.85 + 0.2 * checker + 0.05 * fine)[..., None]
    haze = (1.0 - np.exp(-t / 60.0))[..., None]
    elevation = np.clip(rays[..., 2], 0.0, 1.0)[..., None] ** 0.5
    sky = look.sky_horizon * (1 - elevation) + look.sky_zenith * elevation
    return np.where(down[..., None], ground_rgb * (1 - haze) + look.sky_horizon * haze, sky)


def clip_near(polygon: np.ndarray, near: float = NEAR_M) -> np.ndarray:
    """Clip a camera-frame polygon ``[V, 3]`` to ``z >= near`` (Sutherland-Hodgman, one plane)."""
    out = []
    for i in range(len(polygon)):
        a, b = polygon[i], polygon[(i + 1) % len(polygon)]
        a_in, b_in = a[2] >= near, b[2] >= near
        if a_in:
            out.append(a)
        if a_in != b_in:
            out.append(a + (b - a) * (near - a[2]) / (b[2] - a[2]))
    return np.array(out).reshape(-1, 3)


def polygon_mask(pixels: np.ndarray, image_size: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Pixels covered by a convex polygon ``[V, 2]`` as (row/col slices, bool mask), or None.

    A pixel is covered when its centre is inside every edge (either winding).
    """
    w, h = image_size
    lo = np.maximum(np.floor(pixels.min(0)).astype(int), 0)
    hi = np.minimum(np.ceil(pixels.max(0)).astype(int), [w, h])
    if len(pixels) < 3 or np.any(hi <= lo):
        return None
    u, v = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5)
    a, b = pixels, np.roll(pixels, -1, axis=0)
    area2 = np.sum(a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1])
    if abs(area2) < 1e-9:
        return None
    cross = ((b[:, 0] - a[:, 0])[:, None, None] * (v - a[:, 1, None, None])
             - (b[:, 1] - a[:, 1])[:, None, None] * (u - a[:, 0, None, None]))      # [V, h', w']
    inside = np.all(cross * np.sign(area2) >= 0, axis=0)
    return (slice(lo[1], hi[1]), slice(lo[0], hi[0])), inside


def face_colors(color: np.ndarray, normals: np.ndarray, sun: np.ndarray) -> np.ndarray:
    """Lambert-shaded colours ``[5, 3]`` of a box's faces; front lighter, back darker (heading cue)."""
    shade = 0.45 + 0.55 * np.clip(normals @ sun, 0.0, 1.0)
    rgb = color[None, :] * shade[:, None]
    rgb[FRONT] = 0.55 * rgb[FRONT] + 0.45 * 255.0
    rgb[BACK] = 0.5 * rgb[BACK]
    return rgb


def draw_box(image: np.ndarray, ids: np.ndarray, rig: Rig, cam: int, box_corners: np.ndarray,
             yaw: float, color: np.ndarray, sun: np.ndarray, box_id: int) -> None:
    """Fill the camera-facing faces of one box (corners ``[8, 3]``, lidar frame) into ``image``/``ids``."""
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    normals = FACE_NORMALS @ rot.T                                      # [5, 3] lidar frame
    colors = face_colors(color, normals, sun)
    eye = rig.cam2lidar[cam][:3, 3]
    cam_corners = rig.to_camera(box_corners, cam)                       # [8, 3]
    for f, face in enumerate(FACES):
        centre = box_corners[list(face)].mean(0)
        if np.dot(normals[f], eye - centre) <= 0:                       # back-facing
            continue
        poly = clip_near(cam_corners[list(face)])
        if len(poly) < 3:
            continue
        hit = polygon_mask(rig.project(poly), rig.image_size)
        if hit is None:
            continue
        region, mask = hit
        image[region][mask] = colors[f]
        ids[region][mask] = box_id


def render_camera(rig: Rig, cam: int, boxes: Boxes, look: Look, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 RGB ``[H, W, 3]``, visible pixels per box ``[N]``) for camera ``cam``."""
    image = background(rig, cam, look)
    w, h = rig.image_size
    ids = np.full((h, w), -1, dtype=np.int32)
    box_corners = corners(boxes)                                        # [N, 8, 3]
    eye = rig.cam2lidar[cam][:3, 3]
    order = np.argsort(-np.linalg.norm(boxes.centers - eye, axis=1), kind="stable")    # far -> near
    for i in order:
        draw_box(image, ids, rig, cam, box_corners[i], float(boxes.yaws[i]), look.colors[i], look.sun, int(i))
    image = image + rng.normal(0.0, look.noise_std, image.shape)
    visible = np.bincount(ids[ids >= 0], minlength=len(boxes))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), visible


def render_scene(rig: Rig, boxes: Boxes, look: Look, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 images ``[6, H, W, 3]``, visible pixels ``[N, 6]`` per box and camera)."""
    images, visible = [], []
    for cam in range(rig.num_cameras):
        img, vis = render_camera(rig, cam, boxes, look, rng)
        images.append(img)
        visible.append(vis)
    return np.stack(images), np.stack(visible, axis=1).reshape(len(boxes), rig.num_cameras)
