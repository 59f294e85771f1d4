"""Train the `demo` detector from scratch on synthetic scenes (edgeprune's own DETR-style training).

Hungarian matching (scipy), sigmoid focal loss for classes, L1 for boxes, auxiliary losses on
every decoder layer, AdamW with warm-up and cosine decay, gradient clipping. Progress goes to
stderr and to --log; the resumable state is saved every --save-every minutes (--resume
continues from it); the fp16 weights (what edgeprune ships for `--model demo`) are written
to -o at the end. With --time-budget and no --steps, the step count is estimated from the
first steps' speed and logged, so --steps repeats the schedule.

examples:
  edgeprune dataset synth -o scenes-train --scenes 1600 --seed 1
  edgeprune train-demo --data scenes-train -o demo.pt --time-budget 56 --log train.log
  edgeprune train-demo --data scenes-train -o demo-gpq100.pt --init demo.pt --gpq-keep 100 --steps 1200 --lr 5e-5
  edgeprune export --model demo --scope full --checkpoint demo.pt -o demo.onnx
"""
from __future__ import annotations

import argparse
import logging

NAME = "train-demo"
HELP = "train the demo detector from scratch on a synthetic dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="training dataset (edgeprune dataset synth)")
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="fp16 weights file written at the end")
    parser.add_argument("--state", default=None, metavar="PATH",
                        help="resumable training state (default: OUTPUT.state)")
    parser.add_argument("--log", default=None, metavar="PATH", help="also write the progress log to this file")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="stop after this many minutes (the schedule is fitted to it)")
    parser.add_argument("--steps", type=int, default=None, help="total optimiser steps (fixes the schedule)")
    parser.add_argument("--grow-step", type=int, default=None,
                        help="step at which the 2-layer decoder grows to full depth (default: at 75%% of the run)")
    parser.add_argument("--geometry-steps", type=int, default=60,
                        help="steps of the geometric warm start of the position embeddings (default 60; 0: none)")
    parser.add_argument("--batch", type=int, default=1, help="scenes per step (default 1)")
    parser.add_argument("--lr", type=float, default=1.5e-4,
                        help="AdamW learning rate (default 1.5e-4; 3e-4 kept the decoder from learning in a "
                             "400-step probe)")
    parser.add_argument("--token-weight", type=float, default=None,
                        help="weight of the dense token supervision, a training-only head that teaches every "
                             "image token its object's class and depth (default 1 from scratch; 0 with --init, "
                             "whose weights hold no token head: a fresh one would disturb the trained backbone)")
    parser.add_argument("--denoise", type=int, default=2, metavar="COPIES",
                        help="query denoising: COPIES positive and COPIES negative training-only queries per "
                             "ground-truth box (default 2; 0: off)")
    parser.add_argument("--init", default=None, metavar="WEIGHTS",
                        help="fine-tune: start from these weights (a train-demo output) at full depth, "
                             "without the random initialisation and geometric warm start")
    parser.add_argument("--gpq-keep", type=int, default=None, metavar="N",
                        help="GPQ fine-tune (needs --init and --steps): remove the lowest-scoring query step by "
                             "step over the first half of the run until N are left; writes OUTPUT's "
                             ".keep.json for edgeprune rewrite --method gpq --keep-indices")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--save-every", type=float, default=5.0, metavar="MINUTES",
                        help="save the resumable state this often (default 5)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N scenes only")
    parser.add_argument("--resume", action="store_true", help="continue from --state if it exists")


def _token_weight(args: argparse.Namespace) -> float:
    """--token-weight, or its default: 1 from scratch, 0 for a fine-tune (--init has no token head)."""
    if args.token_weight is not None:
        return float(args.token_weight)
    return 1.0 if args.init is None else 0.0


def run(args: argparse.Namespace) -> int:
    from edgeprune.errors import ParameterError
    from edgeprune.io import check_command_files
    from edgeprune.training.loop import TrainConfig, train

    if args.time_budget is None and args.steps is None:
        raise ParameterError("give --time-budget MINUTES or --steps N (how long to train)")
    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ParameterError(f"{flag} must be >= 1 (got {value})")
    if args.gpq_keep is not None and args.init is None:
        raise ParameterError("--gpq-keep fine-tunes trained weights: give them with --init WEIGHTS")
    state = args.state or f"{args.output}.state"
    outputs = {"-o": args.output, "--state": state, "--log": args.log}
    if args.gpq_keep is not None:
        from edgeprune.training.loop import keep_indices_path
        outputs["kept indices"] = str(keep_indices_path(args.output))
    check_command_files({"--init": args.init} if args.init else {}, outputs)
    if args.log:
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("edgeprune").addHandler(handler)
    logging.getLogger("edgeprune.training").setLevel(logging.INFO)
    cfg = TrainConfig(data=args.data, output=args.output, state=state, steps=args.steps, grow_step=args.grow_step,
                      geometry_steps=args.geometry_steps,
                      time_budget_s=None if args.time_budget is None else args.time_budget * 60,
                      batch=args.batch, lr=args.lr, seed=args.seed, token_weight=_token_weight(args),
                      denoise_copies=args.denoise, init=args.init, gpq_keep=args.gpq_keep, threads=args.threads,
                      save_every_s=args.save_every * 60, limit=args.limit, resume=args.resume)
    summary = train(cfg)
    print(f"trained {int(summary['steps'])} steps in {summary['seconds'] / 60:.1f} min; "
          f"weights {args.output}, resumable state {state}")
    if args.gpq_keep is not None:
        print(f"GPQ kept {args.gpq_keep} queries: {outputs['kept indices']}")
    return 0
