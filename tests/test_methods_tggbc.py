"""tgGBC torch reference against a direct numpy transcription of shared/docs/methods.md."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ParameterError
from edgeprune.methods import tggbc
from edgeprune.models.config import DecoderConfig
from edgeprune.models.decoder import PETRHead


def numpy_keep_sets(logits: np.ndarray, attn: np.ndarray, r: int, k: int,
                    use_class: bool = True, reduce: str = "max") -> list[set[int]]:
    """methods.md steps 1-4, per batch element, written independently with numpy."""
    out = []
    for b in range(logits.shape[0]):
        red = {"max": logits[b].max(-1), "mean": logits[b].mean(-1), "min": logits[b].min(-1)}[reduce]
        c = 1.0 / (1.0 + np.exp(-red.astype(np.float64)))                      # step 1
        a = attn[b].mean(0).astype(np.float64)                                # head mean [Nq, Nk]
        rows = np.argsort(-c)[:k] if k > 0 else np.arange(len(c))              # step 2
        w = c[rows] if use_class else np.ones(len(rows))
        s = (a[rows] * w[:, None]).sum(0)                                     # step 3
        out.append(set(np.argsort(s)[r:].tolist()))                           # step 4
    return out


@pytest.mark.parametrize("k,use_class,reduce", [(0, True, "max"), (7, True, "max"), (0, False, "max"),
                                                (7, True, "mean"), (0, True, "min")])
def test_keep_indices_match_numpy(k: int, use_class: bool, reduce: str) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 20, 10, generator=gen)
    attn = torch.rand(2, 4, 20, 64, generator=gen).softmax(-1)
    keep = tggbc.keep_indices(logits, attn, 25, k, use_class_score=use_class, class_reduce=reduce)
    assert keep.shape == (2, 39)
    expected = numpy_keep_sets(logits.numpy(), attn.numpy(), 25, k, use_class, reduce)
    assert [set(row.tolist()) for row in keep] == expected


def test_schedule_examples() -> None:
    assert tggbc.schedule(9002, 2, 6) == [4500, 4502, 0, 0, 0, 0]
    assert tggbc.schedule(21000, 1, 6) == [21000, 0, 0, 0, 0, 0]
    assert tggbc.schedule(9, 3, 6) == [2, 2, 5, 0, 0, 0]       # 9 // 3 = 3 is odd -> 2
    assert tggbc.schedule(0, 2, 6) == [0] * 6
    assert tggbc.schedule(100, 0, 6) == [0] * 6
    with pytest.raises(ParameterError):
        tggbc.schedule(10, 7, 6)


def test_gather_keys_per_batch() -> None:
    x = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 3]])
    got = tggbc.gather_keys(x, idx)
    assert torch.equal(got[0], x[0, [4, 0]]) and torch.equal(got[1], x[1, [1, 3]])
    mask = torch.tensor([[True, False, False, False, True], [False] * 5])
    assert tggbc.gather_keys(mask, idx).tolist() == [[True, True], [False, False]]


def small_head(attention: str = "manual", **kw: int) -> PETRHead:
    torch.manual_seed(0)
    cfg = DecoderConfig(num_layers=3, embed_dims=32, num_heads=4, ffn_dims=64, num_queries=24,
                        attention=attention, **kw)
    return PETRHead(cfg, num_keys=80).eval()


@pytest.mark.parametrize("attention", ["manual", "torch"])
def test_r0_equals_unpruned_exactly(attention: str) -> None:
    head = small_head(attention)
    x = head.example_inputs(batch=2)
    with torch.no_grad():
        base, zero = head(**x), head(**x, pruning=tggbc.TgGBCConfig(r=0, n=2, k=5))
    assert torch.equal(base.all_cls_scores, zero.all_cls_scores)
    assert torch.equal(base.all_bbox_preds, zero.all_bbox_preds)
    assert all(k is None for k in zero.keep_indices)


def test_pruned_head_equals_numpy_driven_layers() -> None:
    """Run the layers by hand, choosing keys with the numpy transcription; compare outputs."""
    head = small_head()
    x = head.example_inputs(batch=2)
    cfg = tggbc.TgGBCConfig(r=30, n=2, k=10)
    with torch.no_grad():
        pruned = head(**x, pruning=cfg)
        tgt, ref = head._initial_queries(2, None, None, None)
        qpos = head.query_embedding(tggbc_sine(head, ref))
        mem, pos = x["memory"], x["key_pos"]
        drops = tggbc.schedule(30, 2, 3)
        for l, layer in enumerate(head.layers):
            tgt, probs = layer(tgt, qpos, mem, pos, None, None, None)
            logits, boxes = head._predict(tgt, torch.logit(ref.clamp(1e-5, 1 - 1e-5)))
            assert torch.allclose(logits, pruned.layer_logits[l], atol=1e-5)
            if drops[l]:
                keep = numpy_keep_sets(logits.numpy(), probs.numpy(), drops[l], cfg.k)
                idx = torch.tensor([sorted(s) for s in keep])
                mem, pos = tggbc.gather_keys(mem, idx), tggbc.gather_keys(pos, idx)
        assert torch.allclose(boxes, pruned.all_bbox_preds[-1], atol=1e-5)
    assert [p.shape[-1] for p in pruned.cross_attn_probs] == [80, 66, 50]


def tggbc_sine(head: PETRHead, ref: torch.Tensor) -> torch.Tensor:
    from edgeprune.models.decoder import sine_embedding_3d
    return sine_embedding_3d(ref, head.cfg.embed_dims // 2)


def test_manual_and_torch_attention_compute_the_same_function() -> None:
    manual, torch_mha = small_head("manual"), small_head("torch")
    torch_mha.load_state_dict(manual.state_dict())
    x = manual.example_inputs(batch=2)
    with torch.no_grad():
        a, b = manual(**x, pruning=tggbc.TgGBCConfig(r=20, n=1)), torch_mha(**x, pruning=tggbc.TgGBCConfig(r=20, n=1))
    assert torch.allclose(a.all_cls_scores, b.all_cls_scores, atol=1e-5)
    assert torch.allclose(a.all_bbox_preds, b.all_bbox_preds, atol=1e-5)


def test_key_padding_mask_is_gathered_with_keys() -> None:
    head = small_head()
    x = head.example_inputs(batch=1)
    mask = torch.zeros(1, 80, dtype=torch.bool)
    mask[0, :10] = True
    with torch.no_grad():
        out = head(**x, key_padding_mask=mask, pruning=tggbc.TgGBCConfig(r=20, n=1))
    assert out.cross_attn_probs[0][..., :10].abs().max() == 0      # masked keys get no attention
    assert torch.isfinite(out.all_cls_scores).all()


@pytest.mark.parametrize("cfg,msg", [(tggbc.TgGBCConfig(r=80), "smaller than the number of keys"),
                                     (tggbc.TgGBCConfig(r=10, n=4), "exceeds the number of decoder layers"),
                                     (tggbc.TgGBCConfig(r=10, k=25), "exceeds the number of queries"),
                                     (tggbc.TgGBCConfig(r=-1), ">= 0")])
def test_out_of_range_parameters(cfg: tggbc.TgGBCConfig, msg: str) -> None:
    head = small_head()
    with pytest.raises(ParameterError, match=msg):
        head(**head.example_inputs(), pruning=cfg)
