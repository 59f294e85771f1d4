"""A fixed 6-camera rig and PETR's 3D position embedding of the image tokens.

PETR gives every image token a position by lifting its pixel to a frustum of ``D`` points
along the camera ray, mapping them to the ego/lidar frame with the camera matrices, and
encoding the ``D x 3`` coordinates with a 1x1-conv MLP. With one fixed rig the coordinates
are constants (a buffer, folded into the exported graph); only the MLP is learned.

The rig (nuScenes-like ring; ego/lidar frame x forward, y left, z up; camera frame OpenCV:
x right, y down, z forward)::

    camera           yaw (deg)   position (m, lidar frame)
    CAM_FRONT            0       (0.8 cos yaw, 0.8 sin yaw, -0.3)
    CAM_FRONT_RIGHT    -60       same ring
    CAM_FRONT_LEFT      60
    CAM_BACK           180
    CAM_BACK_LEFT      120
    CAM_BACK_RIGHT    -120

Camera order is nuScenes' (the order PETR's data pipeline stacks them in). Cameras sit on
a 0.8 m ring, 0.3 m below the lidar (nuScenes: lidar at 1.84 m, cameras at ~1.5 m).
Intrinsics for an input image ``W x H``: ``fx = fy = 0.7915 * W`` (nuScenes CAM_FRONT:
1266.4 px at 1600 px width, i.e. a 64.6 deg horizontal field of view, so neighbours overlap
slightly at 60 deg steps), principal point ``(W/2, H/2)``, no distortion.

Frustum (PETR's defaults): pixel of feature cell ``(r, c)`` is ``(c * W/w, r * H/h)``;
``D = 64`` depths with linear-increasing discretisation (LID)
``d_i = 1 + (61.2 - 1) * i * (i + 1) / (D * (D + 1))``, ``i = 0 .. 63`` (1 m to 59.35 m);
coordinates normalised by the point-cloud range ``[-61.2, -61.2, -10, 61.2, 61.2, 10]`` and
passed through inverse-sigmoid. PETR also masks keys whose frustum leaves that range for
more than half its depths; for this rig that mask is empty at every preset image size
(tested), so no key padding mask is produced.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgeprune.errors import ParameterError

CAMERA_NAMES = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT",
                "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
CAMERA_YAWS_DEG = (0.0, -60.0, 60.0, 180.0, 120.0, -120.0)
RING_RADIUS_M = 0.8
CAMERA_HEIGHT_M = -0.3            # relative to the lidar
FOCAL_PER_WIDTH = 1266.4 / 1600.0  # fx = fy = FOCAL_PER_WIDTH * W

DEPTH_NUM = 64
DEPTH_START = 1.0
POINT_CLOUD_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
STRIDE = 16
_EPS = 1e-5


def intrinsics(image_size: tuple[int, int]) -> Tensor:
    """Pinhole matrix ``[3, 3]`` (float64) of every camera for an input image ``(W, H)``."""
    w, h = image_size
    f = FOCAL_PER_WIDTH * w
    return torch.tensor([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def cam2lidar() -> Tensor:
    """Rigid transforms ``[6, 4, 4]`` (float64) from each camera frame to the lidar frame."""
    mats = []
    for yaw_deg in CAMERA_YAWS_DEG:
        yaw = math.radians(yaw_deg)
        forward = [math.cos(yaw), math.sin(yaw), 0.0]   # camera +z
        right = [math.sin(yaw), -math.cos(yaw), 0.0]    # camera +x
        down = [0.0, 0.0, -1.0]                         # camera +y
        m = torch.eye(4, dtype=torch.float64)
        m[:3, :3] = torch.tensor([right, down, forward], dtype=torch.float64).T
        m[:3, 3] = torch.tensor([RING_RADIUS_M * math.cos(yaw), RING_RADIUS_M * math.sin(yaw), CAMERA_HEIGHT_M])
        mats.append(m)
    return torch.stack(mats)


def img2lidar(image_size: tuple[int, int]) -> Tensor:
    """``[6, 4, 4]`` maps of homogeneous ``(u*d, v*d, d, 1)`` to lidar ``(x, y, z, 1)``."""
    k_inv = torch.eye(4, dtype=torch.float64)
    k_inv[:3, :3] = torch.linalg.inv(intrinsics(image_size))
    return cam2lidar() @ k_inv


def lid_depths(depth_num: int = DEPTH_NUM) -> Tensor:
    """``[D]`` depths (m) of PETR's linear-increasing discretisation, from DEPTH_START."""
    i = torch.arange(depth_num, dtype=torch.float64)
    bin_size = (POINT_CLOUD_RANGE[3] - DEPTH_START) / (depth_num * (1 + depth_num))
    return DEPTH_START + bin_size * i * (i + 1)


def frustum_points(image_size: tuple[int, int], depth_num: int = DEPTH_NUM) -> Tensor:
    """Lidar-frame points ``[6, h, w, D, 3]`` (float64), normalised to [0, 1] by the range."""
    w_img, h_img = image_size
    w, h = w_img // STRIDE, h_img // STRIDE
    u = torch.arange(w, dtype=torch.float64) * (w_img / w)
    v = torch.arange(h, dtype=torch.float64) * (h_img / h)
    d = lid_depths(depth_num).clamp(min=_EPS)
    vv, uu, dd = torch.meshgrid(v, u, d, indexing="ij")                   # [h, w, D]
    homog = torch.stack([uu * dd, vv * dd, dd, torch.ones_like(dd)], -1)   # [h, w, D, 4]
    pts = torch.einsum("nij,hwdj->nhwdi", img2lidar(image_size), homog)[..., :3]
    lo = torch.tensor(POINT_CLOUD_RANGE[:3], dtype=torch.float64)
    hi = torch.tensor(POINT_CLOUD_RANGE[3:], dtype=torch.float64)
    return (pts - lo) / (hi - lo)                                          # [6, h, w, D, 3]


def out_of_range_mask(image_size: tuple[int, int], depth_num: int = DEPTH_NUM) -> Tensor:
    """PETR's key mask ``[6, h, w]``: True where over half the frustum leaves the range."""
    pts = frustum_points(image_size, depth_num)
    outside = ((pts > 1.0) | (pts < 0.0)).flatten(-2).sum(-1)
    return outside > depth_num * 0.5


def inverse_sigmoid(x: Tensor, eps: float = _EPS) -> Tensor:
    """``log(x / (1 - x))`` with both clamped to ``eps`` (PETR's definition)."""
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def frustum_coords(image_size: tuple[int, int], depth_num: int = DEPTH_NUM) -> Tensor:
    """The MLP input ``[6, D*3, h, w]`` (float32): channel ``3*i + axis`` for depth ``i``."""
    pts = inverse_sigmoid(frustum_points(image_size, depth_num))          # [6, h, w, D, 3]
    n, h, w = pts.shape[:3]
    return pts.permute(0, 3, 4, 1, 2).reshape(n, depth_num * 3, h, w).float()


class PositionEncoder(nn.Sequential):
    """PETR's ``position_encoder``: ``Conv1x1(D*3 -> 4E), ReLU, Conv1x1(4E -> E)`` on the rig.

    A ``Sequential`` so that parameter names are PETR's (``position_encoder.0.weight``,
    ``position_encoder.2.weight`` ...). The frustum coordinates are a non-persistent buffer:
    derived from the rig and the image size, they are not part of a checkpoint.
    """

    def __init__(self, image_size: tuple[int, int], embed_dims: int = 256, depth_num: int = DEPTH_NUM,
                 num_cameras: int = len(CAMERA_NAMES)) -> None:
        if num_cameras != len(CAMERA_NAMES):
            raise ParameterError(f"the fixed camera rig has {len(CAMERA_NAMES)} cameras, asked for "
                                 f"{num_cameras}; whole-model export supports 6-camera presets only")
        super().__init__(nn.Conv2d(depth_num * 3, embed_dims * 4, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(embed_dims * 4, embed_dims, 1))
        self.register_buffer("coords", frustum_coords(image_size, depth_num), persistent=False)
        for conv in (self[0], self[2]):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, batch: int) -> Tensor:  # type: ignore[override]
        """-> ``[B, 6, E, h, w]``, the same embedding for every batch element."""
        x = self.coords                                   # [6, D*3, h, w]
        for layer in self:
            x = layer(x)                                  # -> [6, E, h, w]
        return x.unsqueeze(0).expand(batch, -1, -1, -1, -1)
