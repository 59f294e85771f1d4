"""ToMe torch reference against a numpy transcription of ToMe's bipartite soft matching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ParameterError
from edgeprune.methods import tome
from edgeprune.models.config import DecoderConfig
from edgeprune.models.decoder import PETRHead


def numpy_merge_groups(metric: np.ndarray, r: int) -> list[list[int]]:
    """One batch element: the original positions each output key stands for, in output order.

    Written from the ToMe paper: A = even, B = odd positions; every A token's most similar B
    token by cosine; the r A tokens with the highest similarity join their B token. Output:
    kept A tokens in position order, then the B tokens.
    """
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    a_pos, b_pos = np.arange(0, len(unit), 2), np.arange(1, len(unit), 2)
    sim = unit[a_pos] @ unit[b_pos].T                                        # [Na, Nb]
    best, match = sim.max(1), sim.argmax(1)
    order = np.argsort(-best, kind="stable")
    groups = [[int(a_pos[i])] for i in sorted(order[r:])]
    b_groups = [[int(p)] for p in b_pos]
    for i in order[:r]:
        b_groups[match[i]].append(int(a_pos[i]))
    return groups + b_groups


def test_one_merge_matches_numpy_groups() -> None:
    gen = torch.Generator().manual_seed(1)
    metric = torch.randn(2, 31, 6, generator=gen)
    memory = torch.randn(2, 31, 5, generator=gen)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    size = torch.ones(2, 31, 1)
    merged, _, new_size = tome.merge_keys(memory, memory * 2, size, unit, 9)
    assert merged.shape == (2, 22, 5) and new_size.shape == (2, 22, 1)
    for b in range(2):
        groups = numpy_merge_groups(metric[b].double().numpy(), 9)
        want = np.stack([memory[b, g].double().mean(0).numpy() for g in groups])
        np.testing.assert_allclose(merged[b].numpy(), want, atol=1e-6)
        assert new_size[b, :, 0].tolist() == [len(g) for g in groups]


def test_two_merges_average_original_tokens_with_sizes() -> None:
    """Size weighting makes a twice-merged key the plain mean of every original key in it."""
    gen = torch.Generator().manual_seed(2)
    memory = torch.randn(1, 40, 4, generator=gen)
    metric1 = torch.randn(1, 40, 3, generator=gen)
    metric2 = torch.randn(1, 28, 3, generator=gen)
    norm = lambda m: m / m.norm(dim=-1, keepdim=True)  # noqa: E731
    m1, _, s1 = tome.merge_keys(memory, memory, torch.ones(1, 40, 1), norm(metric1), 12)
    m2, _, s2 = tome.merge_keys(m1, m1, s1, norm(metric2), 10)
    first = numpy_merge_groups(metric1[0].double().numpy(), 12)
    second = numpy_merge_groups(metric2[0].double().numpy(), 10)
    groups = [sum((first[i] for i in g), []) for g in second]             # original positions
    assert sorted(sum(groups, [])) == list(range(40))
    want = np.stack([memory[0, g].double().mean(0).numpy() for g in groups])
    np.testing.assert_allclose(m2[0].numpy(), want, atol=1e-5)
    assert s2[0, :, 0].tolist() == [len(g) for g in groups]


def test_merge_all_of_set_a_and_none() -> None:
    x = torch.randn(1, 7, 2)
    metric = x / x.norm(dim=-1, keepdim=True)
    same = tome.merge_keys(x, x, torch.ones(1, 7, 1), metric, 0)
    assert torch.equal(same[0], torch.cat([x[:, ::2][:, tome.bipartite_soft_matching(metric, 0).unmerged[0]],
                                           x[:, 1::2]], dim=1))
    full = tome.merge_keys(x, x, torch.ones(1, 7, 1), metric, 4)         # all 4 A keys of 7
    assert full[0].shape == (1, 3, 2) and full[2].sum().item() == 7
    with pytest.raises(ParameterError):
        tome.bipartite_soft_matching(metric, 5)


def small_head(attention: str = "manual") -> PETRHead:
    torch.manual_seed(0)
    cfg = DecoderConfig(num_layers=3, embed_dims=32, num_heads=4, ffn_dims=64, num_queries=24,
                        attention=attention)
    return PETRHead(cfg, num_keys=80).eval()


@pytest.mark.parametrize("attention", ["manual", "torch"])
def test_r0_is_the_unmerged_head_exactly(attention: str) -> None:
    head = small_head(attention)
    x = head.example_inputs(batch=2)
    with torch.no_grad():
        base, same = head(**x), tome.forward_with_tome(head, x, tome.ToMeConfig(r=0, n=2))
    assert torch.equal(base.all_cls_scores, same.head.all_cls_scores)
    assert torch.equal(base.all_bbox_preds, same.head.all_bbox_preds)


def test_head_merges_on_schedule_with_key_metric() -> None:
    """Layer widths follow tgGBC's schedule; layer 1 sees layer 0's metric-driven merge."""
    head = small_head()
    x = head.example_inputs(batch=2)
    with torch.no_grad():
        out = tome.forward_with_tome(head, x, tome.ToMeConfig(r=50, n=2))
        e, attn = 32, head.layers[0].cross_attn
        keys = (x["memory"] + x["key_pos"]) @ attn.in_proj_weight[e:2 * e].T + attn.in_proj_bias[e:2 * e]
        metric = keys.reshape(2, 80, 4, 8).mean(2).numpy()                    # head mean [B, Nk, d]
    assert [p.shape[-1] for p in out.head.cross_attn_probs] == [80, 56, 30]
    assert [s.sum().item() for s in out.sizes] == [160.0] * 3
    for b in range(2):
        groups = numpy_merge_groups(metric[b].astype(np.float64), 24)        # schedule(50, 2) = [24, 26, 0]
        assert out.sizes[1][b, :, 0].tolist() == [len(g) for g in groups]


def test_schedule_beyond_half_of_the_keys_is_refused() -> None:
    with pytest.raises(ParameterError, match="at most half"):
        tome.ToMeConfig(r=70, n=1).validate(80, 3)
    with pytest.raises(ParameterError, match="smaller than the number of keys"):
        tome.ToMeConfig(r=80, n=2).validate(80, 3)
    with pytest.raises(ParameterError):
        tome.ToMeConfig(r=-1).validate(80, 3)
    assert tome.ToMeConfig(r=40, n=2).validate(80, 3) == [20, 20, 0]
    assert tome.max_merges(7) == 4
