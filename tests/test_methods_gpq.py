"""GPQ pruner: schedule, scores, and the smaller model equals the big one on kept queries."""
from __future__ import annotations

import pytest
import torch

from edgeprune.errors import ParameterError
from edgeprune.methods import gpq
from edgeprune.models.config import DecoderConfig
from edgeprune.models.decoder import PETRHead


def test_query_scores_is_max_over_classes_mean_over_batch() -> None:
    logits = torch.tensor([[[1.0, 3.0], [0.0, -1.0]], [[5.0, 2.0], [-2.0, -4.0]]])   # [B=2, Nq=2, C=2]
    assert gpq.query_scores(logits).tolist() == [4.0, -1.0]


def test_pruner_drops_lowest_average_on_schedule() -> None:
    pruner = gpq.GPQPruner(num_queries=5, num_to_prune=2, interval=3)
    # query 3 is lowest on average over the first 3 iterations (not in the last one alone)
    rounds = [[1, 1, 1, -5, 1], [1, 1, 1, 2, 0], [1, 1, 1, 2, 0]]
    removed = []
    for scores in rounds:
        pruner.record(torch.tensor(scores, dtype=torch.float32)[None, :, None])
        removed.append(pruner.step())
    assert removed == [None, None, 3]
    assert pruner.kept_indices == [0, 1, 2, 4]
    # record now covers the 4 kept queries; query 4 (original numbering) is lowest
    for _ in range(3):
        pruner.record(torch.tensor([[[2.0], [3.0], [1.0], [0.5]]]))
        last = pruner.step()
    assert last == 4 and pruner.kept_indices == [0, 1, 2] and pruner.finished
    pruner.record(torch.zeros(1, 3, 1))
    assert pruner.step() is None                      # done: nothing more is removed


def test_pruner_rejects_logits_of_wrong_query_count() -> None:
    pruner = gpq.GPQPruner(num_queries=5, num_to_prune=1, interval=1)
    with pytest.raises(ParameterError, match="query_indices"):
        pruner.record(torch.zeros(1, 4, 10))


def test_reference_interval() -> None:
    assert gpq.reference_interval(iters_per_epoch=3517, num_to_prune=600) == 3517 * 6 // 600


@pytest.mark.parametrize("temporal", [False, True])
def test_smaller_model_equals_big_model_on_kept_queries(temporal: bool) -> None:
    torch.manual_seed(1)
    extra = dict(num_queries=20, num_propagated=8, memory_len=14) if temporal else dict(num_queries=28)
    cfg = DecoderConfig(num_layers=2, embed_dims=32, num_heads=4, ffn_dims=64, **extra)
    head = PETRHead(cfg, num_keys=60).eval()
    x = head.example_inputs(batch=2)
    pruner = gpq.GPQPruner(num_queries=28, num_to_prune=9, interval=1)
    with torch.no_grad():
        while not pruner.finished:
            out = head(**x, query_indices=pruner.kept_indices)
            pruner.record(out.layer_logits[-1])
            pruner.step()
        kept = pruner.kept_indices
        small = pruner.prune_model(head)
        small_x = dict(x)
        if temporal:
            prop = [i - 20 for i in kept if i >= 20]
            small_x["prev_query"], small_x["prev_ref"] = x["prev_query"][:, prop], x["prev_ref"][:, prop]
        big, got = head(**x, query_indices=kept), small(**small_x)
    assert len(kept) == 19 and got.all_cls_scores.shape[2] == 19
    assert small.reference_points.weight.shape[0] == len([i for i in kept if i < cfg.num_queries])
    assert torch.allclose(big.all_cls_scores, got.all_cls_scores, atol=1e-6)
    assert torch.allclose(big.all_bbox_preds, got.all_bbox_preds, atol=1e-6)


def test_one_shot_ranking_keeps_highest_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    logits = torch.tensor([[[0.0], [5.0], [1.0], [3.0]]])
    with caplog.at_level("WARNING"):
        assert gpq.rank_queries_one_shot([logits, logits], keep=2) == [1, 3]
    assert "fine-tuning" in caplog.text


def test_select_queries_validates_indices() -> None:
    head = PETRHead(DecoderConfig(num_layers=1, embed_dims=32, num_heads=4, ffn_dims=64, num_queries=10))
    for bad in ([], [0, 0], [10], [-1]):
        with pytest.raises(ParameterError):
            head.select_queries(bad)
