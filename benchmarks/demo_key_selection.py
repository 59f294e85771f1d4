"""Which image tokens does tgGBC keep on the trained demo, and why does random pruning keep up?

Issue 10 asks tgGBC at half the keys (n=2, k=175) to beat random pruning; on the shipped demo
weights it does not (``results/demo_random_seeds.md``). This script looks at the selection
itself, in the torch model (``edgeprune.methods.tggbc``, the reference the ONNX pass is tested
against), on held-out scenes whose objects are known:

1. **Does tgGBC's importance find objects?** ROC AUC of the importance ``S`` (and of the
   attention alone) separating tokens covered by an object's projected box from the rest,
   after each pruning layer. 0.5 = no better than chance.
2. **What survives**: the share of object tokens kept, the mean share of each object's tokens
   kept, and the share of objects left with no token at all, for tgGBC, tgGBC without the class
   score, and random subsets (several seeds) at the same schedule.
3. **How the unpruned decoder attends**, per layer: the share of the top-k queries' attention on
   object tokens (against their share of the keys), and the normalised entropy of that attention.
   **Where it looks instead**: the share on the few tokens that get the most attention over all
   scenes (fixed tokens: attention sinks if the same ones lead in every scene, listed by camera,
   row and column), and the share of each layer's unpruned attention that the keys a method keeps
   in the end hold (for the layers after the pruning point: what they lose; for the pruning
   layers, tgGBC's own criterion, so they favour it by construction).
4. **What the selection does to the detections**: mAP and AP per distance of the
   torch model (same decoding as ``edgeprune eval``), and the confident queries (best-class score
   >= 0.3) that are true (an object of that class within 2 m) or false positives.

    python benchmarks/demo_key_selection.py --data scenes-test              # ~3 min; results/demo_key_selection.md
    python benchmarks/demo_key_selection.py --data scenes-test --weights demo-ft.pt --out DIR
    python benchmarks/demo_key_selection.py --data scenes-test --quick      # smoke run: 4 scenes, 1 seed, r=528
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import _common  # noqa: F401  (puts the checkout on sys.path)

TOP_K = 175
PRUNING_LAYERS = 2
CONFIDENT = 0.3              # best-class score of a query counted as a detection in part 4
NEAR_M = 2.0                 # a confident query within this centre distance of a same-class object is true
FIXED_TOKENS = 16            # part 3: the tokens with the most attention over all scenes, per layer


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="held-out scenes (edgeprune dataset synth --seed 9001)")
    p.add_argument("--weights", default=None, help="train-demo weights (default: the shipped ones)")
    p.add_argument("--scenes", type=int, default=None, help="use the first N scenes (default: all)")
    p.add_argument("--r", type=int, nargs="+", default=[528, 792], help="keys pruned in total (default: 528 792)")
    p.add_argument("--seeds", type=int, default=5, help="random subsets per r (default: 5)")
    p.add_argument("--out", type=Path, default=_common.RESULTS, help="directory for demo_key_selection.md/.json")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 scenes, 1 random seed, r=528")
    args = p.parse_args(argv)
    if args.quick:
        args.scenes, args.seeds, args.r = min(args.scenes or 4, 4), 1, [528]
    return args


@dataclass
class RandomKeys:
    """A random key subset with tgGBC's schedule: the baseline, as a KeyReduction of the torch head."""

    r: int
    n: int
    seed: int
    generator: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch
        self.generator = torch.Generator().manual_seed(self.seed)

    def layer_schedule(self, num_keys: int, num_layers: int, num_queries: int) -> List[int]:
        from edgeprune.methods.tggbc import schedule
        return schedule(self.r, self.n, num_layers)

    def reduce(self, keys, amount: int, layer, logits, probs):
        import torch
        from edgeprune.methods.tggbc import kept_keys
        nk = keys.memory.shape[1]
        return kept_keys(keys, torch.randperm(nk, generator=self.generator)[amount:].sort().values[None])


@dataclass
class OracleKeys(RandomKeys):
    """Ground truth decides: object-covered tokens kept first (or dropped first), ties broken at random.

    Not a method, a probe: if keeping every object token does not beat a random subset, the
    layers after the pruning point do not need the objects' own tokens more than any others.
    """

    covered: "np.ndarray" = None           # [Nk] bool, object-covered original tokens
    objects_first: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        import numpy as np
        self.index = np.arange(len(self.covered))    # original token of each current key

    def reduce(self, keys, amount: int, layer, logits, probs):
        import torch
        from edgeprune.methods.tggbc import kept_keys
        jitter = torch.rand(len(self.index), generator=self.generator)
        objects = torch.from_numpy(self.covered[self.index]).float()
        score = jitter + (objects if self.objects_first else -objects)
        keep = score.argsort()[amount:].sort().values[None]
        self.index = self.index[keep[0].numpy()]
        return kept_keys(keys, keep)


def kept_original(keeps: Sequence, num_keys: int) -> "np.ndarray":
    """Chain per-layer keep indices (each into the previous layer's keys) to original token indices."""
    import numpy as np
    index = np.arange(num_keys)
    for keep in keeps:
        if keep is not None:
            index = index[keep[0].numpy()]
    return index


def auc(score: "np.ndarray", positive: "np.ndarray") -> float:
    """ROC AUC of ``score`` for the boolean labels (Mann-Whitney U, ties averaged)."""
    from scipy.stats import rankdata
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def object_footprints(gt, rig) -> List["np.ndarray"]:
    """One boolean [Nk] mask per ground-truth box: the tokens its projected box covers (occlusion ignored)."""
    from edgeprune.training.dense import token_targets
    masks = [token_targets(gt.select([i]), rig).labels.numpy() >= 0 for i in range(len(gt))]
    return [m for m in masks if m.any()]


@dataclass
class Survival:
    """What a key subset keeps of one scene's objects."""

    object_tokens: float          # share of object-covered tokens kept
    per_object: float             # mean over objects of the share of its tokens kept
    lost: float                   # share of objects with no kept token


def survival(kept: "np.ndarray", covered: "np.ndarray", footprints: List["np.ndarray"]) -> Survival:
    import numpy as np
    mask = np.zeros_like(covered)
    mask[kept] = True
    shares = [float(mask[f].mean()) for f in footprints]
    return Survival(float(mask[covered].mean()), float(np.mean(shares)), float(np.mean([s == 0 for s in shares])))


def confident_queries(logits, code, gt, pc_range) -> "tuple[int, int]":
    """(true, false) positives among the queries whose best-class score is >= CONFIDENT."""
    import numpy as np
    from edgeprune.evaluation.decode import top_queries
    boxes, _ = top_queries(logits, code, len(logits), pc_range)
    keep = boxes.scores >= CONFIDENT
    centres, labels = boxes.centers[keep], boxes.labels[keep]
    if len(gt) == 0:
        return 0, int(keep.sum())
    dist = np.linalg.norm(centres[:, None, :2] - gt.centers[None, :, :2], axis=-1)
    near = ((dist <= NEAR_M) & (labels[:, None] == gt.labels[None, :])).any(axis=1)
    return int(near.sum()), int((~near).sum())


def top_attention(probs, logits) -> "np.ndarray":
    """Head-averaged attention rows ``[k, Nk]`` of the top-k queries by class confidence (tgGBC's k)."""
    from edgeprune.methods.tggbc import query_confidence
    top = query_confidence(logits)[0].topk(TOP_K).indices
    return probs.mean(dim=1)[0][top].numpy()


def attention_stats(attn: "np.ndarray", covered: "np.ndarray") -> Dict[str, float]:
    """Share of the rows' attention on object tokens, and its normalised entropy."""
    import numpy as np
    entropy = -(np.log(np.clip(attn, 1e-12, None)) * attn).sum(1).mean() / np.log(attn.shape[1])
    return {"on_objects": float(attn[:, covered].sum(1).mean()), "entropy": float(entropy)}


def fixed_tokens(mean_attention: "np.ndarray", grid: "tuple[int, int]") -> Dict[str, object]:
    """``[scenes, Nk]`` mean attention per key -> the FIXED_TOKENS keys with the most over all scenes:
    their share per scene, how many of them lead in each scene too, and where they are."""
    import numpy as np
    fixed = np.argsort(mean_attention.mean(0))[::-1][:FIXED_TOKENS]
    per_scene = [set(np.argsort(m)[::-1][:FIXED_TOKENS].tolist()) for m in mean_attention]
    cells = grid[0] * grid[1]
    where = [(int(t) // cells, int(t) % cells // grid[1], int(t) % grid[1]) for t in sorted(fixed)]
    return {"share": float(mean_attention[:, fixed].sum(1).mean()),
            "overlap": float(np.mean([len(p & set(fixed.tolist())) / FIXED_TOKENS for p in per_scene])),
            "camera_row_col": where}


@dataclass
class Collector:
    """Everything measured, scene by scene (one instance per run)."""

    methods: Dict[str, object]                 # name -> (r, covered) -> KeyReduction
    r_values: List[int]
    kept: Dict[str, Dict[int, List[Survival]]] = field(default_factory=dict)
    aucs: Dict[str, List[float]] = field(default_factory=dict)
    layers: List[List[Dict[str, float]]] = field(default_factory=list)
    mean_attention: List[List["np.ndarray"]] = field(default_factory=list)   # scene -> layer -> [Nk]
    held: Dict[str, Dict[int, List[List[float]]]] = field(default_factory=dict)  # name -> r -> scene -> layer
    token_share: List[float] = field(default_factory=list)
    preds: Dict[str, list] = field(default_factory=dict)
    confident: Dict[str, List[tuple]] = field(default_factory=dict)
    gts: list = field(default_factory=list)

    def scene(self, model, memory, key_pos, gt, covered: "np.ndarray", footprints: List["np.ndarray"], data) -> None:
        from edgeprune.methods.tggbc import key_importance
        self.gts.append(gt)
        self.token_share.append(float(covered.mean()))
        out = model.head(memory, key_pos)
        self.detections(out, "none", gt, data)
        attention = [top_attention(p, lg) for p, lg in zip(out.cross_attn_probs, out.layer_logits)]
        self.layers.append([attention_stats(a, covered) for a in attention])
        self.mean_attention.append([a.mean(0) for a in attention])
        for layer in range(PRUNING_LAYERS):                # importance over all keys, unpruned run
            attn = out.cross_attn_probs[layer].mean(dim=1)
            for name, use_class in (("S (tgGBC)", True), ("attention alone", False)):
                s = key_importance(out.layer_logits[layer], attn, TOP_K, use_class_score=use_class)[0].numpy()
                self.aucs.setdefault(f"{name}, layer {layer}", []).append(auc(s, covered))
        for name, make in self.methods.items():
            for r in self.r_values:
                pruned = model.head(memory, key_pos, pruning=make(r, covered))
                kept = kept_original(pruned.keep_indices, len(covered))
                self.kept.setdefault(name, {}).setdefault(r, []).append(survival(kept, covered, footprints))
                self.held.setdefault(name, {}).setdefault(r, []).append([float(a[:, kept].sum(1).mean())
                                                                         for a in attention])
                self.detections(pruned, f"{name}, r={r}", gt, data)

    def detections(self, out, name: str, gt, data) -> None:
        """Decode the last layer like ``edgeprune eval`` does and count confident true/false queries."""
        from edgeprune.evaluation.decode import top_detections
        from edgeprune.evaluation.evaluate import TOP_N
        logits, code = out.all_cls_scores[-1, 0].numpy(), out.all_bbox_preds[-1, 0].numpy()
        self.preds.setdefault(name, []).append(top_detections(logits, code, TOP_N, data.pc_range))
        self.confident.setdefault(name, []).append(confident_queries(logits, code, gt, data.pc_range))

    def scored(self, classes) -> Dict[str, dict]:
        """mAP, NDS, AP per distance and confident true/false counts per method and r."""
        import numpy as np
        from edgeprune.evaluation.metrics import evaluate
        out = {}
        for name, preds in self.preds.items():
            m = evaluate(self.gts, preds, classes)
            per_distance = {str(d): float(np.mean([m.ap[c][d] for c in m.ap])) for d in next(iter(m.ap.values()))}
            tp, fp = np.sum(self.confident[name], axis=0)
            out[name] = {"mAP": m.mean_ap, "NDS": m.nds, "ap_per_distance": per_distance,
                         "confident_true": int(tp), "confident_false": int(fp)}
        return out


def pruning_methods(seeds: int) -> Dict[str, object]:
    """tgGBC (and its no-class-score ablation), random subsets, the two ground-truth oracles."""
    from edgeprune.methods.tggbc import TgGBCConfig
    methods = {"tgGBC": lambda r, _: TgGBCConfig(r=r, n=PRUNING_LAYERS, k=TOP_K),
               "tgGBC, no class score": lambda r, _: TgGBCConfig(r=r, n=PRUNING_LAYERS, k=TOP_K,
                                                                 use_class_score=False)}
    methods.update({f"random s{s}": (lambda r, _, seed=s: RandomKeys(r, PRUNING_LAYERS, seed)) for s in range(seeds)})
    methods["oracle: object tokens first"] = lambda r, covered: OracleKeys(r, PRUNING_LAYERS, 0, covered, True)
    methods["oracle: object tokens last"] = lambda r, covered: OracleKeys(r, PRUNING_LAYERS, 0, covered, False)
    return methods


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from edgeprune.data.render import Rig
    from edgeprune.models.build import build_model
    from edgeprune.training.data import MIN_VISIBLE_PIXELS, TrainingSet

    model = build_model("demo", "full", seed=0, shipped_weights=args.weights is None).eval()
    if args.weights:
        from edgeprune.models.checkpoint import load_checkpoint
        load_checkpoint(model, args.weights)
    data = TrainingSet(args.data, model.preset.image_size, args.scenes)
    meta = data.dataset.meta
    rig = Rig(meta.intrinsics, meta.cam2lidar, tuple(meta.image_size))
    found = Collector(pruning_methods(args.seeds), list(args.r))
    with torch.no_grad():
        for i in range(len(data)):
            gt = data.dataset.ground_truth(i, MIN_VISIBLE_PIXELS)
            footprints = object_footprints(gt, rig)
            if footprints:                                  # scenes without a visible object say nothing here
                memory, key_pos = model.image_tokens(data.batch(np.array([i]))[0])
                found.scene(model, memory, key_pos, gt, data.token_targets[i].labels.numpy() >= 0, footprints, data)
            print(f"\rscene {i + 1}/{len(data)}", end="", flush=True)
    print()
    grid = tuple(model.position_encoder.coords.shape[2:])               # feature rows, columns per camera
    result = summarise(args, found, int(data.token_targets[0].labels.numel()), grid)
    result["detections"] = found.scored(data.classes)
    return result


def summarise(args: argparse.Namespace, found: Collector, num_keys: int, grid: "tuple[int, int]") -> dict:
    import numpy as np
    kept, aucs, layers, token_share = found.kept, found.aucs, found.layers, found.token_share
    table = {name: {str(r): {f: float(np.mean([getattr(s, f) for s in rows]))
                             for f in ("object_tokens", "per_object", "lost")}
                    for r, rows in per_r.items()} for name, per_r in kept.items()}
    per_layer = [{k: float(np.mean([scene[layer][k] for scene in layers])) for k in layers[0][0]}
                 for layer in range(len(layers[0]))]
    for layer, stats in enumerate(per_layer):
        stats["fixed_tokens"] = fixed_tokens(np.stack([scene[layer] for scene in found.mean_attention]), grid)
    held = {name: {str(r): np.mean(rows, axis=0).tolist() for r, rows in per_r.items()}
            for name, per_r in found.held.items()}
    return {"scenes": len(layers), "keys": num_keys, "object_token_share": float(np.mean(token_share)),
            "auc": {k: float(np.nanmean(v)) for k, v in aucs.items()}, "kept": table, "layers": per_layer,
            "attention_held": held, "grid": list(grid),
            "command": _common.command_line(), "code": _common.git_state()["head"]}


def report(result: dict) -> str:
    lines = [f"# Which keys tgGBC keeps on the trained demo ({result['scenes']} held-out scenes, "
             f"{result['keys']} keys, n={PRUNING_LAYERS}, k={TOP_K})", "",
             f"Command: `{result['command']}` (code at {result['code']})", "",
             f"Tokens covered by an object's projected box: {100 * result['object_token_share']:.1f}% of the keys.", "",
             "## Does the importance find object tokens? (ROC AUC, 0.5 = chance)", "",
             "| importance | AUC |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["auc"].items()]
    lines += ["", "## What survives the pruning", "",
              "| method | r | object tokens kept | mean share of each object kept | objects with no token left |",
              "|---|---|---|---|---|"]
    for name, per_r in result["kept"].items():
        for r, s in per_r.items():
            lines.append(f"| {name} | {r} | {100 * s['object_tokens']:.1f}% | {100 * s['per_object']:.1f}% "
                         f"| {100 * s['lost']:.1f}% |")
    lines += ["", "## How the unpruned decoder attends (top-k queries, head-averaged)", "",
              "| layer | attention on object tokens | normalised entropy |", "|---|---|---|"]
    lines += [f"| {i} | {100 * s['on_objects']:.1f}% | {s['entropy']:.3f} |" for i, s in enumerate(result["layers"])]
    lines += where_it_looks(result)
    dets = result["detections"]
    distances = list(next(iter(dets.values()))["ap_per_distance"])
    lines += ["", "## Detections (torch model, same decoding as edgeprune eval)", "",
              "| method | mAP | NDS | " + " | ".join(f"AP@{d} m" for d in distances)
              + f" | confident (>= {CONFIDENT}) true | confident false |",
              "|---|---|---|" + "---|" * len(distances) + "---|---|"]
    for name, d in dets.items():
        lines.append(f"| {name} | {d['mAP']:.4f} | {d['NDS']:.4f} | "
                     + " | ".join(f"{d['ap_per_distance'][x]:.3f}" for x in distances)
                     + f" | {d['confident_true']} | {d['confident_false']} |")
    return "\n".join(lines) + "\n"


def where_it_looks(result: dict) -> List[str]:
    """Report part 3b: fixed tokens per layer, and the share of each layer's attention the kept keys hold."""
    import numpy as np
    layers, held = result["layers"], result["attention_held"]
    rows, cols = result["grid"]
    lines = ["", f"## Where it looks instead: the {FIXED_TOKENS} tokens with the most attention over all scenes",
             "", f"Tokens per camera: {rows} rows x {cols} columns (row 0 = top of the image).", "",
             f"| layer | attention on those {FIXED_TOKENS} tokens | of them among a scene's own top {FIXED_TOKENS} "
             "| where (camera, row, column) |", "|---|---|---|---|"]
    for i, s in enumerate(layers):
        f = s["fixed_tokens"]
        where = " ".join(f"{c}:{r},{k}" for c, r, k in f["camera_row_col"])
        lines.append(f"| {i} | {100 * f['share']:.1f}% | {100 * f['overlap']:.0f}% | {where} |")
    for r in next(iter(held.values())):
        lines += ["", f"### Share of each unpruned layer's attention (top-k queries) on the keys kept at r={r}", "",
                  "| method | " + " | ".join(f"layer {i}" for i in range(len(layers))) + " |",
                  "|---|" + "---|" * len(layers)]
        randoms = [per_r[r] for name, per_r in held.items() if name.startswith("random")]
        shown = {name: per_r[r] for name, per_r in held.items() if not name.startswith("random")}
        if randoms:
            shown[f"random ({len(randoms)} seeds, mean)"] = np.mean(randoms, axis=0).tolist()
        lines += [f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in values) + " |"
                  for name, values in shown.items()]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = report(result)
    _common.write_results(args.out / f"demo_key_selection{'-quick' if args.quick else ''}", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
