"""Checkpoint loading: roundtrip in both scopes and every error path (one line, model untouched)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from edgeprune.errors import CheckpointError, ModelNotFoundError
from edgeprune.models.build import build_model
from edgeprune.models.checkpoint import load_checkpoint
from edgeprune.models.config import DecoderConfig, ModelPreset

TINY = ModelPreset("tiny-r18", "petr", "resnet18", (64, 32),
                   decoder=DecoderConfig(num_layers=2, num_queries=40, ffn_dims=128))
BIGGER_HEAD = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, num_queries=50))


@pytest.fixture(scope="module")
def full_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A seed-0 full model and its saved state dict."""
    model = build_model(TINY, "full", seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "full.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def other_full() -> torch.nn.Module:
    """A seed-1 full model that only ever sees failing loads (which must leave it untouched)."""
    return build_model(TINY, "full", seed=1)


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(*model.example_inputs(batch=2, seed=7).values())


@pytest.mark.slow
def test_full_roundtrip_reproduces_outputs(full_state: tuple[Path, torch.nn.Module]) -> None:
    path, reference = full_state
    other = build_model(TINY, "full", seed=1)
    assert not torch.allclose(_outputs(other)[0], _outputs(reference)[0])
    loaded = build_model(TINY, "full", seed=1, checkpoint=str(path))
    for got, expected in zip(_outputs(loaded), _outputs(reference)):
        assert torch.equal(got, expected)


def test_decoder_roundtrip_from_training_checkpoint_layout(tmp_path: Path) -> None:
    reference = build_model(TINY, "decoder", seed=0)
    path = tmp_path / "epoch_24.pth"
    torch.save({"state_dict": reference.state_dict(), "meta": {"epoch": 24}}, path)
    loaded = load_checkpoint(build_model(TINY, "decoder", seed=3), path)
    for got, expected in zip(_outputs(loaded), _outputs(reference)):
        assert torch.equal(got, expected)


@pytest.mark.slow
def test_missing_num_batches_tracked_is_accepted(full_state: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, reference = full_state
    state = {k: v for k, v in torch.load(path).items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(reference.state_dict())
    torch.save(state, tmp_path / "old.pth")
    loaded = load_checkpoint(build_model(TINY, "full", seed=1), tmp_path / "old.pth")
    assert torch.equal(_outputs(loaded)[1], _outputs(reference)[1])


def _expect_error(model: torch.nn.Module, path: Path, error: type[Exception], *fragments: str) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        load_checkpoint(model, path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"
    return msg


def test_missing_file_and_directory(tmp_path: Path) -> None:
    model = build_model(TINY, "decoder")
    _expect_error(model, tmp_path / "nope.pth", ModelNotFoundError, "nope.pth", "does not exist")
    _expect_error(model, tmp_path, ModelNotFoundError, "is a directory")


@pytest.mark.parametrize("content", ["text", "list", "non_tensor_values", "empty", "whole_module"])
def test_files_that_are_not_state_dicts(tmp_path: Path, content: str) -> None:
    model = build_model(TINY, "decoder")
    path = tmp_path / f"{content}.pth"
    if content == "text":
        path.write_text("this is not a checkpoint\n")
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "non_tensor_values":
        torch.save({"head.reference_points.weight": [0.0, 1.0]}, path)
    elif content == "empty":
        torch.save({}, path)
    else:
        torch.save(model, path)     # the whole module: not loadable without executing code
    _expect_error(model, path, CheckpointError, str(path), "state dict")


@pytest.mark.slow
def test_key_mismatch_names_counts_and_first_keys(full_state: tuple[Path, torch.nn.Module],
                                                  other_full: torch.nn.Module, tmp_path: Path) -> None:
    path, _ = full_state
    state = torch.load(path)
    removed = ["head.post_norm.weight", "neck.fpn_conv.bias"]
    for key in removed:
        del state[key]
    state["head.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    msg = _expect_error(other_full, tmp_path / "bad.pth", CheckpointError,
                        "2 missing keys", *removed, "1 unexpected keys (head.extra.weight)", "tiny-r18")
    assert "shape" not in msg


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    torch.save(build_model(BIGGER_HEAD, "decoder").state_dict(), tmp_path / "q50.pth")
    _expect_error(build_model(TINY, "decoder"), tmp_path / "q50.pth", CheckpointError,
                  "1 shape mismatches", "head.reference_points.weight (checkpoint [50, 3] vs model [40, 3])")


@pytest.mark.slow
def test_wrong_scope_and_prefixed_keys_get_a_hint(full_state: tuple[Path, torch.nn.Module],
                                                  other_full: torch.nn.Module, tmp_path: Path) -> None:
    path, _ = full_state
    decoder = build_model(TINY, "decoder")
    torch.save(decoder.state_dict(), tmp_path / "decoder.pth")
    _expect_error(other_full, tmp_path / "decoder.pth", CheckpointError,
                  "missing keys (backbone.", "--scope decoder")
    _expect_error(decoder, path, CheckpointError, "unexpected keys (backbone.", "--scope full")
    torch.save({f"module.{k}": v for k, v in decoder.state_dict().items()}, tmp_path / "ddp.pth")
    _expect_error(decoder, tmp_path / "ddp.pth", CheckpointError, "prefix 'module.'")


def test_other_decoder_depth_is_named(tmp_path: Path) -> None:
    torch.save(build_model(TINY, "decoder", num_layers=1).state_dict(), tmp_path / "one_layer.pth")
    _expect_error(build_model(TINY, "decoder"), tmp_path / "one_layer.pth", CheckpointError,
                  "missing keys (head.layers.1.", "checkpoint has 1 decoder layers, the model 2")
