"""Whole-model (scope full) reference detector: shapes, token layout, rig geometry, export."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from edgeprune.errors import ModelNotFoundError, ParameterError, UserError
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.models import position
from edgeprune.models.backbone import build_backbone
from edgeprune.models.build import build_model
from edgeprune.models.config import DecoderConfig, ModelPreset
from edgeprune.models.presets import PRESETS, get_preset

# 96x64 images: feature map 6x4 per camera -> 144 keys; a small decoder keeps tests fast.
TINY = dataclasses.replace(get_preset("focalpetr-r18-704x256"), name="tiny-r18", image_size=(96, 64),
                           decoder=DecoderConfig(num_queries=60, ffn_dims=256))
TINY_KEYS = 6 * (64 // 16) * (96 // 16)
TINY_STREAM = ModelPreset("tiny-stream-r18", "streampetr", "resnet18", (64, 32), decoder=DecoderConfig(
    num_layers=2, num_queries=24, num_propagated=8, memory_len=20, ffn_dims=128))


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_model(TINY, "full", seed=0, num_layers=2)


@pytest.fixture(scope="module")
def stream() -> torch.nn.Module:
    return build_model(TINY_STREAM, "full", seed=2)


def test_forward_shapes_and_key_count(tiny: torch.nn.Module) -> None:
    inputs = tiny.example_inputs(batch=2, seed=0)
    assert tiny.input_names() == ["images"] and inputs["images"].shape == (2, 6, 3, 64, 96)
    with torch.no_grad():
        cls, box = tiny(*inputs.values())
        memory, key_pos = tiny.image_tokens(inputs["images"])
        out = tiny.run(**inputs)
    assert cls.shape == (2, 2, 60, 10) and box.shape == (2, 2, 60, 10)
    assert memory.shape == key_pos.shape == (2, TINY_KEYS, 256)
    assert [p.shape for p in out.cross_attn_probs] == [(2, 8, 60, TINY_KEYS)] * 2
    assert torch.equal(out.all_cls_scores, cls) and torch.isfinite(cls).all() and torch.isfinite(box).all()
    assert tiny.output_names() == ["all_cls_scores", "all_bbox_preds"] and tiny.scope == "full"
    assert not tiny.training


def test_tokens_are_well_scaled(tiny: torch.nn.Module) -> None:
    """Calibrated random weights give unit-scale tokens, like a trained backbone."""
    with torch.no_grad():
        memory, key_pos = tiny.image_tokens(tiny.example_inputs(1, 3)["images"])
    assert 0.3 < memory.std().item() < 3.0 and 0.3 < key_pos.std().item() < 3.0


def test_tokens_are_camera_major_then_row_then_column(tiny: torch.nn.Module) -> None:
    images = tiny.example_inputs(batch=2, seed=1)["images"]
    with torch.no_grad():
        memory, _ = tiny.image_tokens(images)
        feats = tiny.neck(*tiny.backbone(images[1, 4:5]))        # camera 4 of batch element 1
    h, w = 64 // 16, 96 // 16
    for row, col in [(0, 0), (1, 3), (h - 1, w - 1)]:
        j = 4 * h * w + row * w + col
        torch.testing.assert_close(memory[1, j], feats[0, :, row, col], rtol=1e-5, atol=1e-5)


def _petr_coords_numpy(image_size: tuple[int, int]) -> np.ndarray:
    """PETR's ``position_embeding`` transcribed: lidar2img from the rig numbers, inverted."""
    w_img, h_img = image_size
    h, w, depth = h_img // 16, w_img // 16, position.DEPTH_NUM
    f = position.FOCAL_PER_WIDTH * w_img
    k4 = np.array([[f, 0, w_img / 2, 0], [0, f, h_img / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    axes = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)  # camera xyz -> ego at yaw 0
    idx = np.arange(depth, dtype=float)
    coords_d = 1.0 + (61.2 - 1.0) / (depth * (1 + depth)) * idx * (idx + 1)
    grid = np.stack(np.meshgrid(np.arange(w) * w_img / w, np.arange(h) * h_img / h, coords_d,
                                indexing="ij"), -1)                       # [W, H, D, 3]
    grid[..., :2] *= np.maximum(grid[..., 2:3], 1e-5)
    grid = np.concatenate([grid, np.ones_like(grid[..., :1])], -1)
    lo, hi = np.array([-61.2, -61.2, -10.0]), np.array([61.2, 61.2, 10.0])
    out = []
    for yaw in np.radians(position.CAMERA_YAWS_DEG):
        rz = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
        cam2lidar = np.eye(4)
        cam2lidar[:3, :3] = rz @ axes
        cam2lidar[:3, 3] = [0.8 * math.cos(yaw), 0.8 * math.sin(yaw), -0.3]
        img2lidar = np.linalg.inv(k4 @ np.linalg.inv(cam2lidar))
        pts = (grid @ img2lidar.T)[..., :3]                               # [W, H, D, 3]
        pts = np.clip((pts - lo) / (hi - lo), 0, 1)
        pts = np.log(np.maximum(pts, 1e-5) / np.maximum(1 - pts, 1e-5))
        out.append(pts.transpose(2, 3, 1, 0).reshape(depth * 3, h, w))    # [D*3, H, W]
    return np.stack(out)


def test_position_embedding_matches_petr_transcription(tiny: torch.nn.Module) -> None:
    coords = _petr_coords_numpy(TINY.image_size)                          # [6, D*3, h, w]
    np.testing.assert_allclose(position.frustum_coords(TINY.image_size).numpy(), coords, atol=2e-4)
    enc = tiny.position_encoder
    w1, b1 = enc[0].weight.detach().numpy()[:, :, 0, 0], enc[0].bias.detach().numpy()
    w2, b2 = enc[2].weight.detach().numpy()[:, :, 0, 0], enc[2].bias.detach().numpy()
    flat = coords.transpose(0, 2, 3, 1).reshape(-1, coords.shape[1])       # [6*h*w, D*3] camera-major
    expected = np.maximum(flat @ w1.T + b1, 0) @ w2.T + b2                # [6*h*w, E]
    with torch.no_grad():
        _, key_pos = tiny.image_tokens(tiny.example_inputs(2, 0)["images"])
    np.testing.assert_allclose(key_pos[1].numpy(), expected, atol=1e-3, rtol=1e-3)


def test_rig_cameras_look_along_their_yaw() -> None:
    pts = position.frustum_points((704, 256))                            # [6, h, w, D, 3] in [0, 1]
    lo, hi = torch.tensor([-61.2, -61.2, -10.0]), torch.tensor([61.2, 61.2, 10.0])
    centre = (pts[:, 8, 22, -1].float() * (hi - lo) + lo)                # principal ray, far depth
    for cam, yaw in enumerate(position.CAMERA_YAWS_DEG):
        direction = math.atan2(centre[cam, 1].item(), centre[cam, 0].item())
        assert math.isclose(math.remainder(direction - math.radians(yaw), 2 * math.pi), 0, abs_tol=1e-3)


def test_petr_frustum_mask_is_empty_for_every_preset_size() -> None:
    """Why the detector passes no key padding mask: PETR's mask would be all False."""
    for size in {p.image_size for p in PRESETS.values()}:
        assert not position.out_of_range_mask(size).any(), size


@pytest.mark.slow
def test_same_seed_same_model_and_same_head_in_both_scopes(tiny: torch.nn.Module) -> None:
    again = build_model(TINY, "full", seed=0, num_layers=2)
    other = build_model(TINY, "full", seed=1, num_layers=2)
    inputs = tiny.example_inputs(1, 5)
    with torch.no_grad():
        a, b, c = tiny(*inputs.values())[0], again(*inputs.values())[0], other(*inputs.values())[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)
    decoder = build_model(TINY, "decoder", seed=0, num_layers=2)
    for (name, x), (_, y) in zip(decoder.head.state_dict().items(), tiny.head.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_full_model_equals_head_on_its_tokens_with_temporal_inputs(stream: torch.nn.Module) -> None:
    model = stream
    assert model.input_names() == ["images", "prev_query", "prev_ref", "temp_memory", "temp_pos"]
    inputs = model.example_inputs(batch=2, seed=0)
    assert inputs["prev_query"].shape == (2, 8, 256) and inputs["temp_memory"].shape[:2] == (2, 12)
    with torch.no_grad():
        cls, box = model(*inputs.values())
        memory, key_pos = model.image_tokens(inputs.pop("images"))
        direct = model.head(memory, key_pos, **inputs)
    assert cls.shape == (2, 2, 32, 10)
    assert torch.equal(cls, direct.all_cls_scores) and torch.equal(box, direct.all_bbox_preds)


def test_full_model_runs_tggbc_pruning(tiny: torch.nn.Module) -> None:
    inputs = tiny.example_inputs(2, 0)
    with torch.no_grad():
        out = tiny.run(**inputs, pruning=TgGBCConfig(r=100, n=1, k=20))
    assert out.keep_indices[0].shape == (2, TINY_KEYS - 100)
    assert out.cross_attn_probs[1].shape == (2, 8, 60, TINY_KEYS - 100)


@pytest.mark.slow
def test_checkpoint_interchangeable_between_attention_impls(tiny: torch.nn.Module) -> None:
    torch_attn = build_model(TINY, "full", seed=9, num_layers=2, attention="torch")
    torch_attn.load_state_dict(tiny.state_dict())
    inputs = tiny.example_inputs(1, 0)
    with torch.no_grad():
        for x, y in zip(tiny(*inputs.values()), torch_attn(*inputs.values())):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,channels,blocks", [
    ("resnet18", (256, 512), (2, 2, 2, 2)),
    ("resnet50", (1024, 2048), (3, 4, 6, 3)),
    ("resnet101", (1024, 2048), (3, 4, 23, 3)),
])
def test_resnet_stages(name: str, channels: tuple[int, int], blocks: tuple[int, ...]) -> None:
    net = build_backbone(name).eval()
    assert tuple(len(getattr(net, f"layer{i}")) for i in range(1, 5)) == blocks
    with torch.no_grad():
        c4, c5 = net(torch.randn(1, 3, 64, 96))
    assert c4.shape == (1, channels[0], 4, 6) and c5.shape == (1, channels[1], 2, 3)
    assert net.out_channels == channels


def test_vovnet_full_scope_is_a_clear_error_but_decoder_scope_works() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        build_model("petr-vov-1600x640", "full")
    msg = str(err.value)
    assert "VoVNet" in msg and "resnet50" in msg and "--scope decoder" in msg and "\n" not in msg
    decoder = build_model("petr-vov-1600x640", "decoder", num_layers=1)
    assert decoder.example_inputs(1, 0)["memory"].shape == (1, 24000, 256)


def test_bad_scope_batch_and_image_size(stream: torch.nn.Module) -> None:
    with pytest.raises(UserError, match="decoder, full"):
        build_model(TINY, "backbone")
    for scope_model in (build_model(TINY, "decoder", num_layers=1), stream):
        with pytest.raises(ParameterError, match="batch"):
            scope_model.example_inputs(batch=0)
    with pytest.raises(ParameterError, match="multiple of 32"):
        build_model(dataclasses.replace(TINY, image_size=(100, 64)), "full")
    with pytest.raises(ParameterError, match="images"):
        stream.image_tokens(torch.zeros(1, 5, 3, 32, 64))
    with pytest.raises(ParameterError, match="takes 5 inputs"):
        stream(torch.zeros(1, 6, 3, 32, 64))
    with pytest.raises(ParameterError, match="num_layers"):
        build_model(TINY, "decoder", num_layers=0)
    with pytest.raises(ParameterError, match="manual"):
        build_model(TINY, "decoder", attention="flash")


def test_torchscript_onnx_export_matches_torch(tmp_path, stream: torch.nn.Module) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = stream
    inputs = model.example_inputs(batch=1, seed=0)
    path = tmp_path / "full.onnx"
    torch.onnx.export(model, tuple(inputs.values()), str(path), input_names=model.input_names(),
                      output_names=model.output_names(), opset_version=17, dynamo=False)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == model.input_names()
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        expected = model(*inputs.values())
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=1e-4)


def test_torch_free_backbone_list_matches_the_implemented_backbones() -> None:
    from edgeprune.models.backbone import BACKBONES
    from edgeprune.models.config import WHOLE_MODEL_BACKBONES

    assert set(WHOLE_MODEL_BACKBONES) == set(BACKBONES)
