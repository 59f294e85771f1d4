"""Random key pruning, the ablation baseline of tgGBC (``edgeprune rewrite --method random``).

Same schedule as tgGBC (:func:`edgeprune.methods.tggbc.schedule` through
:func:`~edgeprune.passes.keys.tggbc.plan_key_pruning`: the same r, n and keys per layer), but
the keys each pruning layer keeps are a seeded random subset instead of the most important
ones. Key counts are static, so the subsets are constants chosen when the graph is rewritten
(:func:`random_keep`), the same for every batch element and every input::

    pruning layer l (stage s):  kept_l = sorted random subset of Nk_l - r_l of its Nk_l keys
    chained_s = chained_{s-1}[kept_l]                     into the original keys [K_s], ascending
    every later layer's per-key tensor X [.., Nk, ..] -> Gather(X, chained_s, axis=key axis)

Sorted subsets keep the keys' order, so the chained indices are ascending too. One ``Gather``
with a constant index per (tensor, stage), named ``random/l{l}/gather/``; where the gathered
tensors go is :mod:`edgeprune.passes.keys.feed`, shared with tgGBC and ToMe. No scoring
subgraph is inserted: a gather of constants is all the pruning costs at run time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from edgeprune import _lazy
from edgeprune.errors import ParameterError
from edgeprune.graph.edit import GraphEditor, WorkingModel, model_opset
from edgeprune.graph.shapes import tensor_info
from edgeprune.methods.tggbc import TgGBCConfig
from edgeprune.passes.discovery.structure import DecoderStructure
from edgeprune.passes.keys.feed import (KeyAxes, KeyFeeder, KeyFeedPlan, KeyReductionPass, check_key_counts,
                                      key_counts_from_args, refuse_tggbc_options)
from edgeprune.passes.keys.tggbc import KeyPruningPlan, plan_key_pruning

log = logging.getLogger(__name__)

PREFIX = "random/"
METADATA_KEY = "edgeprune.random"


def random_keep(plan: KeyPruningPlan, seed: int) -> list[np.ndarray]:
    """Per pruning step: the kept keys, ascending int64 indices into that layer's own keys [Nk_l - r_l].

    Each step draws from its own stream (seed, layer), so a layer's subset does not depend on
    how many steps came before it.
    """
    kept = []
    for step in plan.steps:
        rng = np.random.default_rng([seed, step.layer])
        kept.append(np.sort(rng.choice(step.num_keys, step.num_keep, replace=False)).astype(np.int64))
    return kept


def chained_keep(kept: list[np.ndarray]) -> list[np.ndarray]:
    """Per stage s (1..): the keys stage s reads, as indices into the original keys [K_s]."""
    chained: list[np.ndarray] = []
    for idx in kept:
        chained.append(idx if not chained else chained[-1][idx])
    return chained


@dataclass
class _ConstantGatherer:
    """The key transform: one Gather of a constant index per (tensor, stage, axes)."""

    ed: GraphEditor
    layers: tuple[int, ...]                  # pruning layer of each step (names the nodes)
    indices: tuple[np.ndarray, ...]          # per stage - 1: chained indices [K_s]
    cache: dict[tuple[str, int, KeyAxes], Any] = field(default_factory=dict)

    def scope(self, stage: int) -> str:
        return f"{PREFIX}l{self.layers[stage - 1]}/gather/"

    def __call__(self, data: Any, axes: KeyAxes, stage: int) -> Any:
        """data [.., Nk, ..] -> [.., K_s, ..]: every row keeps the same keys, so batch and heads need nothing."""
        key = (data.name, stage, axes)
        if key not in self.cache:
            with self.ed.scoped(self.scope(stage)):
                index = self.ed.const("keep", self.indices[stage - 1])
                self.cache[key] = self.ed.op("Gather", [data, index], "keys", axis=axes.key_axis)
        return self.cache[key]


def rewrite_random_pruning(working: WorkingModel, structure: DecoderStructure, plan: KeyPruningPlan,
                           seed: int) -> None:
    """Gather the later layers' keys with ``plan``'s seeded subsets, in place (nothing when it prunes nothing)."""
    if not plan.steps:
        return
    gs = _lazy.require("onnx_graphsurgeon")
    model = working.proto()
    ed = GraphEditor(gs, working.graph(), model_opset(model), tensor_info(model), scope=PREFIX)   # masks need shapes
    layers = tuple(s.layer for s in plan.steps)
    gatherer = _ConstantGatherer(ed, layers, tuple(chained_keep(random_keep(plan, seed))))
    feed = KeyFeedPlan.after_layers("random pruning", PREFIX, structure, layers, plan.keys_per_layer)
    feeder = KeyFeeder(ed, structure, feed, gatherer)
    for stage in range(1, len(plan.steps) + 1):
        feeder.feed_stage(stage)
    c = plan.config
    working.set_metadata(METADATA_KEY, {"r": c.r, "n": c.n, "seed": seed, "pruning_layers": list(layers),
                                        "keys_per_layer": list(plan.keys_per_layer)})


class RandomPruningPass(KeyReductionPass):
    """``--method random --r R --n N [--seed S]``: tgGBC's schedule, seeded random kept keys."""

    name: ClassVar[str] = "random"
    help: ClassVar[str] = ("random key pruning baseline: tgGBC's schedule (r keys over the first n layers), the kept "
                           "keys a seeded random subset (the command's --seed, default 0)")

    def __init__(self, r: int, n: int = 1, seed: int = 0) -> None:
        check_key_counts(r, n)
        if seed < 0:
            raise ParameterError(f"--seed must be >= 0 (got --seed {seed})")
        self.config, self.seed = TgGBCConfig(r=r, n=n), seed

    @classmethod
    def from_args(cls, args: Any) -> RandomPruningPass:
        """``--seed`` is the rewrite command's (also the verification inputs' seed)."""
        r, n = key_counts_from_args(args, "random", "keys pruned in total", "--r 2000 --n 2")
        refuse_tggbc_options(args, "random", "--r, --n and --seed")
        return cls(r=r, n=n, seed=getattr(args, "seed", 0) or 0)

    def apply(self, working: WorkingModel, structure: DecoderStructure) -> None:
        plan = plan_key_pruning(structure, self.config)
        log.info("random pruning r=%d n=%d seed=%d: after layers %s, keys per layer %s", self.config.r,
                 self.config.n, self.seed, [s.layer for s in plan.steps], list(plan.keys_per_layer))
        rewrite_random_pruning(working, structure, plan, self.seed)

    def __repr__(self) -> str:
        return f"RandomPruningPass(r={self.config.r}, n={self.config.n}, seed={self.seed})"
