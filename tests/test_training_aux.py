"""The training-only supervision of train-demo: token targets against the rig's projection,
denoising queries where they are meant to be, their pass equal to the head's own forward,
and both losses near zero for a perfect prediction and large for a wrong one."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgeprune.data.boxes import Boxes, encode
from edgeprune.data.render import Rig
from edgeprune.models.build import build_model
from edgeprune.models.config import DecoderConfig, ModelPreset
from edgeprune.models.position import STRIDE
from edgeprune.training.dense import NO_OBJECT, TokenTargets, token_loss, token_targets
from edgeprune.training.denoise import (NEGATIVE_NOISE_M, POSITIVE_NOISE_M, denoise_loss, make_queries,
                                        run_queries)
from edgeprune.training.losses import Target

PC_RANGE = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
SIZE = (352, 128)
W, H = SIZE[0] // STRIDE, SIZE[1] // STRIDE
TINY = ModelPreset("tiny-aux", "petr", "resnet-tiny", (64, 32), neck_kernel=1,
                   decoder=DecoderConfig(num_layers=2, embed_dims=32, num_heads=2, ffn_dims=32,
                                         num_classes=4, num_queries=24))


def _boxes(centers: list[list[float]], labels: list[int]) -> Boxes:
    n = len(labels)
    return Boxes(np.array(centers), np.tile([1.9, 4.5, 1.6], (n, 1)), np.zeros(n), np.array(labels))


def _cell(rig: Rig, point: np.ndarray, cam: int) -> int:
    u, v = rig.project(rig.to_camera(point, cam))
    return cam * W * H + int(v // STRIDE) * W + int(u // STRIDE)


def test_token_targets_mark_the_object_the_camera_sees_nearest() -> None:
    """A car 10 m ahead hides a cone-labelled car 20 m ahead on the same ray; the token under
    the near car's centre says its class and log depth; the sky above says nothing; the rear
    camera, which cannot see either, has no object token."""
    rig = Rig.for_image_size(SIZE)
    near, far = np.array([10.8, 0.0, -1.04]), np.array([20.8, 0.0, -1.04])
    targets = token_targets(_boxes([far.tolist(), near.tolist()], [2, 0]), rig)
    cell = _cell(rig, near, 0)
    assert int(targets.labels[cell]) == 0
    depth = rig.to_camera(near, 0)[2]
    assert math.isclose(float(targets.log_depth[cell]), math.log(depth), rel_tol=1e-5)
    assert int(targets.labels[0 * W * H + 0 * W + W // 2]) == NO_OBJECT          # top row of the front camera
    back = slice(3 * W * H, 4 * W * H)
    assert bool((targets.labels[back] == NO_OBJECT).all())
    assert int((targets.labels == 2).sum()) == 0                                 # the far car is hidden


def test_token_targets_of_an_empty_scene_are_all_background() -> None:
    targets = token_targets(Boxes.empty(), Rig.for_image_size(SIZE))
    assert targets.labels.shape == (6 * W * H,) and bool((targets.labels == NO_OBJECT).all())


def test_token_targets_point_each_covered_token_at_its_objects_projected_centre() -> None:
    """The token under the car's centre gets an offset of under half a cell; the token two cells
    to its left gets about +2 columns; both point at the same projected centre."""
    rig = Rig.for_image_size(SIZE)
    centre = np.array([10.8, 0.0, -1.04])
    targets = token_targets(_boxes([centre.tolist()], [0]), rig)
    cu, cv = rig.project(rig.to_camera(centre, 0))
    cell = _cell(rig, centre, 0)
    under = targets.centre_offset[cell].numpy()
    assert np.abs(under).max() <= 0.5 + 1e-5
    left = cell - 2
    assert int(targets.labels[left]) == 0
    col, row = (left % (W * H)) % W, (left % (W * H)) // W
    expected = np.array([cu / STRIDE - (col + 0.5), cv / STRIDE - (row + 0.5)])
    assert np.allclose(targets.centre_offset[left].numpy(), expected, atol=1e-4)
    assert 1.5 <= float(targets.centre_offset[left, 0]) <= 2.5
    assert float(targets.centre_offset[targets.labels == NO_OBJECT].abs().max()) == 0.0


def _token_truth() -> tuple[list[TokenTargets], torch.Tensor]:
    labels = torch.tensor([[-1, 0, 2, -1]])
    depth = torch.tensor([[0.0, 2.0, 3.0, 0.0]])
    offset = torch.tensor([[[0.0, 0.0], [1.5, -0.5], [0.2, 0.1], [0.0, 0.0]]])
    right = torch.full((1, 4, 7), -12.0)
    right[0, 1, 0] = right[0, 2, 2] = 12.0
    right[0, :, 4] = depth[0]
    right[0, :, 5:7] = offset[0]
    return [TokenTargets(labels[0], depth[0], offset[0])], right


def test_token_loss_is_small_for_the_truth_and_large_for_a_wrong_class() -> None:
    targets, right = _token_truth()
    wrong = right.clone()
    wrong[0, 1, 0], wrong[0, 1, 1] = -12.0, 12.0
    assert float(token_loss(right, targets, 4)[0]) < 1e-4
    assert float(token_loss(wrong, targets, 4)[0]) > 1.0


def test_token_loss_counts_the_centre_offset_of_covered_tokens_only() -> None:
    """A wrong offset on a covered token costs its L1 per covered token; on background, nothing."""
    targets, right = _token_truth()
    shifted = right.clone()
    shifted[0, 1, 5] += 3.0
    loss, parts = token_loss(shifted, targets, 4)
    assert math.isclose(parts["token_offset"], 3.0 / 2, rel_tol=1e-5)
    assert float(loss) > 1.4
    background = right.clone()
    background[0, 0, 5:7] = 9.0
    assert float(token_loss(background, targets, 4)[0]) < 1e-4


def _targets(centers: list[list[float]], labels: list[int]) -> Target:
    code = encode(_boxes(centers, labels), PC_RANGE)
    return Target(torch.tensor(labels), torch.from_numpy(code).float())


def test_denoising_queries_sit_near_and_away_from_their_objects() -> None:
    targets = [_targets([[10.0, 5.0, -1.0], [-20.0, 3.0, -1.0]], [1, 3]), _targets([[7.0, -9.0, -1.0]], [0])]
    queries = make_queries(targets, PC_RANGE, torch.Generator().manual_seed(0), copies=3)
    lo, hi = torch.tensor(PC_RANGE[:3]), torch.tensor(PC_RANGE[3:])
    assert queries.ref.shape == (2, 2 * 2 * 3, 3)
    for b, target in enumerate(targets):
        g = len(target.labels)
        centre = (lo + target.code[:, :3] * (hi - lo)).repeat(3, 1)
        points = lo + queries.ref[b] * (hi - lo)
        pos = (points[:g * 3, :2] - centre[:, :2]).norm(dim=1)
        neg = (points[g * 3:2 * g * 3, :2] - centre[:, :2]).norm(dim=1)
        assert bool((pos <= POSITIVE_NOISE_M + 1e-4).all())
        assert bool((neg >= NEGATIVE_NOISE_M[0] - 1e-4).all() and (neg <= NEGATIVE_NOISE_M[1] + 1e-4).all())
        assert queries.labels[b, :g * 3].tolist() == target.labels.repeat(3).tolist()
        assert bool((queries.labels[b, g * 3:] == -1).all())
        assert int(queries.valid[b].sum()) == 2 * g * 3
    assert not bool(queries.valid[1, 6:].any())                                  # padding of the 1-box sample


@pytest.mark.parametrize("content", ["zeros", "position"])
def test_the_denoising_pass_is_the_heads_forward_at_other_reference_points(content: str) -> None:
    """At the head's own reference points, run_queries gives exactly what the head gives,
    whatever the learned queries' content starts as."""
    model = build_model(TINY.with_decoder(query_content=content), "decoder", seed=3)
    inputs = model.example_inputs(batch=2, seed=4)
    out = model.head(inputs["memory"], inputs["key_pos"])
    ref = model.head.reference_points.weight.unsqueeze(0).expand(2, -1, -1)
    logits, boxes = run_queries(model.head, inputs["memory"], inputs["key_pos"], ref)
    assert torch.allclose(logits, out.all_cls_scores, atol=1e-5)
    assert torch.allclose(boxes, out.all_bbox_preds, atol=1e-5)


def test_position_content_starts_each_query_as_its_position_embedding() -> None:
    """With ``query_content='position'`` the queries start as their position embedding, so the
    content carries the reference point; with "zeros" it is all zeros."""
    model = build_model(TINY.with_decoder(query_content="position"), "decoder", seed=3)
    head = model.head
    ref = head.reference_points.weight.detach().unsqueeze(0)
    zeros = ref.new_zeros(1, ref.shape[1], head.cfg.embed_dims)
    plain = build_model(TINY, "decoder", seed=3).head
    with torch.no_grad():
        tgt, query_pos, _ = head.query_start(zeros, ref, torch.ones(1, 5, head.cfg.embed_dims))
        tgt0, _, _ = plain.query_start(zeros, ref, torch.ones(1, 5, head.cfg.embed_dims))
    assert torch.equal(tgt, query_pos) and float(tgt.abs().sum()) > 0
    assert float(tgt0.abs().sum()) == 0.0


@pytest.mark.parametrize("changes, message", [
    ({"query_content": "learned"}, "query_content 'learned' is not one of zeros, position"),
    ({"query_content": "position", "num_propagated": 8}, "learned queries only"),
])
def test_decoder_config_rejects_a_query_content_it_cannot_build(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecoderConfig(**changes)


def test_denoise_loss_is_small_for_the_truth_and_large_for_a_wrong_box() -> None:
    targets = [_targets([[10.0, 5.0, -1.0]], [2])]
    queries = make_queries(targets, PC_RANGE, torch.Generator().manual_seed(1), copies=1)
    logits = torch.full((1, 1, 2, 4), -12.0)
    logits[0, 0, 0, 2] = 12.0
    boxes = queries.code.unsqueeze(0).clone()
    right = float(denoise_loss(logits, boxes, queries, PC_RANGE, 2.0, 0.25)[0])
    boxes[0, 0, 0, 0] += 0.1                                                      # 12 m off in x
    wrong = float(denoise_loss(logits, boxes, queries, PC_RANGE, 2.0, 0.25)[0])
    assert right < 1e-4 and wrong > 2.0
