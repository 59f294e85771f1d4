"""Does a trained demo decoder move boxes off its reference points? (issue 10's open question)

Two measurements on training scenes, with denoising queries placed within 1 m of each object
(``edgeprune.training.denoise``), so every query has a known offset to its object:

1. **Box error per channel** of the last running layer, in the loss space of training (centre
   in metres, log sizes, sin/cos yaw), next to the centre error of predicting the reference
   point itself. Equal centre errors mean the decoder regresses no offset.
2. **Is the offset in the decoder's features at all?** A small MLP is fitted on 80% of the
   queries, from the last layer's normalised output, to the true x/y offset, and scored (L1,
   metres) on the other 20%. Close to "predict 0" means the information never reaches the
   queries, so no box branch could learn it.

    python benchmarks/demo_box_diagnosis.py --weights demo.pt --data scenes-train
    python benchmarks/demo_box_diagnosis.py --weights run.pt.state --layers 2 --data scenes-train

``--weights`` takes a train-demo output (fp16 state dict) or its resumable ``.state`` file.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Tuple

import _common  # noqa: F401  (puts the checkout on sys.path)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="train-demo weights or .state (default: the shipped ones)")
    p.add_argument("--data", required=True, help="training scenes (edgeprune dataset synth)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers that ran in training (default: all)")
    p.add_argument("--scenes", type=int, default=200, help="scenes to draw denoising queries on")
    p.add_argument("--seed", type=int, default=5)
    return p.parse_args(argv)


def load(weights: Optional[str], layers: Optional[int]):
    import torch
    from edgeprune.models.build import build_model
    from edgeprune.models.checkpoint import load_checkpoint
    from edgeprune.training.setup import run_layers

    model = build_model("demo", "full", seed=0, shipped_weights=weights is None)
    if weights:                       # a resumable .state holds the state dict under "model"
        saved = torch.load(weights, map_location="cpu", weights_only=True)
        load_checkpoint(model, weights, state=saved.get("model", saved))
    if layers:
        run_layers(model, layers)
    return model.eval()


def collect(model, args: argparse.Namespace) -> Tuple["torch.Tensor", ...]:
    """-> (box error per channel [Q, 10], at-reference centre error [Q, 3], features [Q, E], offsets [Q, 2])."""
    import numpy as np
    import torch
    from edgeprune.training.data import TrainingSet
    from edgeprune.training.denoise import make_queries, run_queries
    from edgeprune.training.losses import loss_space

    data = TrainingSet(args.data, model.preset.image_size, args.scenes)
    gen = torch.Generator().manual_seed(args.seed)
    lo, hi = torch.tensor(data.pc_range[:3]), torch.tensor(data.pc_range[3:])
    seen: List["torch.Tensor"] = []       # the head's post-norm output, once per layer: the last is what we read
    hook = model.head.post_norm.register_forward_hook(lambda _m, _i, out: seen.append(out))
    errors, at_ref, feats, offsets = [], [], [], []
    with torch.no_grad():
        for i in range(len(data)):
            images, targets, _ = data.batch(np.array([i]))
            memory, key_pos = model.image_tokens(images)
            queries = make_queries(targets, data.pc_range, gen, 2)
            seen.clear()
            _, boxes = run_queries(model.head, memory, key_pos, queries.ref)
            positive = queries.labels[0] >= 0
            truth = loss_space(queries.code[0, positive], data.pc_range)
            errors.append((loss_space(boxes[-1, 0, positive], data.pc_range) - truth).abs())
            offset = (queries.code[0, positive, :3] - queries.ref[0, positive]) * (hi - lo)   # metres, as loss_space
            at_ref.append(offset.abs())
            feats.append(seen[-1][0, positive])
            offsets.append(offset[:, :2])
    hook.remove()
    return torch.cat(errors), torch.cat(at_ref), torch.cat(feats), torch.cat(offsets)


def probe(features, offsets, seed: int) -> Tuple[float, float]:
    """Held-out L1 (m) of an MLP from features to the x/y offset, and of predicting 0."""
    import torch

    torch.manual_seed(seed)
    split = int(0.8 * len(features))
    mlp = torch.nn.Sequential(torch.nn.Linear(features.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(mlp.parameters(), 1e-3)
    for _ in range(300):
        loss = (mlp(features[:split]) - offsets[:split]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held_out = float((mlp(features[split:]) - offsets[split:]).abs().mean())
    return held_out, float(offsets[split:].abs().mean())


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    model = load(args.weights, args.layers)
    errors, at_ref, feats, offsets = collect(model, args)
    names = ("x", "y", "z", "log w", "log l", "log h", "sin", "cos", "vx", "vy")
    mean = errors.mean(0).tolist()
    print(f"{len(errors)} denoising queries (within 1 m of an object) on {args.scenes} scenes of {args.data}")
    print("box L1 per channel: " + "  ".join(f"{n} {v:.3f}" for n, v in zip(names, mean)))
    print("centre L1 if the box stayed at its reference point: "
          + "  ".join(f"{n} {v:.3f}" for n, v in zip(names, at_ref.mean(0).tolist())))
    held_out, zero = probe(feats, offsets, args.seed)
    print(f"offset read from the last layer's features (held-out L1, m): {held_out:.3f}; predicting 0: {zero:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
