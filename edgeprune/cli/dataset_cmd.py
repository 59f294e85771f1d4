"""Make datasets for measuring accuracy: synthetic scenes rendered into edgeprune's 6-camera rig.

`dataset synth` samples objects of four classes (car, pedestrian, traffic_cone, barrier) on
the ground around the ego car and renders them into the six cameras of the fixed rig
(intrinsics and extrinsics of edgeprune.models.position), with occlusion, shading, a
textured ground, sky and noise. The same --seed gives the same bytes; use different seeds
for training and test splits. The format (DIR/dataset.json + DIR/images/*.npy) is
documented in edgeprune/data/format.py. The directory is written atomically.

examples:
  edgeprune dataset synth -o scenes-train --scenes 300 --seed 1
  edgeprune dataset synth -o scenes-test --scenes 50 --seed 2
  edgeprune dataset synth -o scenes-704 --image-size 704x256
"""
from __future__ import annotations

import argparse

NAME = "dataset"
HELP = "generate datasets for eval/compare (synthetic multi-camera scenes)"
DEFAULT_IMAGE_SIZE = "352x128"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    synth = sub.add_parser("synth", help="render synthetic scenes into the 6-camera rig",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("-o", "--output", required=True, metavar="DIR", help="dataset directory to create")
    synth.add_argument("--scenes", type=int, default=200, help="number of scenes (default 200)")
    synth.add_argument("--seed", type=int, default=0, help="seed; scene i depends only on (seed, i) (default 0)")
    synth.add_argument("--image-size", default=DEFAULT_IMAGE_SIZE, metavar="WxH",
                       help=f"per-camera image size, multiples of 32 (default {DEFAULT_IMAGE_SIZE}: "
                            "1056 image tokens at stride 16; 704x256 matches the 704x256 presets)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")


def run(args: argparse.Namespace) -> int:
    from edgeprune.cli.progress import progress_bar
    from edgeprune.data.synth import generate_dataset, parse_image_size

    size = parse_image_size(args.image_size)
    with progress_bar(args.scenes, unit="scene") as progress:
        dataset = generate_dataset(args.output, args.scenes, args.seed, size, args.overwrite, progress)
    boxes = sum(len(s.boxes) for s in dataset.scenes)
    print(f"wrote {dataset.root}: {len(dataset)} scenes, {boxes} boxes, 6 cameras at {size[0]}x{size[1]}, "
          f"classes {', '.join(dataset.meta.classes)} (seed {args.seed})")
    return 0
