"""`dforce COMMAND ...`: one entry point for every job."""

from __future__ import annotations

import argparse
import sys

from dforce import DforceError

DEFAULT_WEIGHTINGS = "independent,paths,teacher,sync,schedule:pyramid,mixture"


def plot_weights(args: argparse.Namespace) -> None:
    from dforce.plots import plot_weightings
    from dforce.trajectory import get_weighting

    weightings = []
    for name in args.weightings.split(","):
        options = {"cube_levels": args.cube_levels}
        if name == "mixture":
            options["components"] = {"paths": 0.5, "teacher": 0.5}
        weightings.append(get_weighting(name, args.frames, args.levels, **options))
    out = plot_weightings(weightings, args.out, samples=args.samples)
    print(f"wrote {out}")


def make_shards(args: argparse.Namespace) -> None:
    from dforce.data import parse_size
    from dforce.shards import make_shards

    summary = make_shards(
        args.inputs,
        args.out,
        clip_frames=args.clip_frames,
        stride=args.stride,
        size=parse_size(args.size) if args.size else None,
        reencode=args.reencode,
        crf=args.crf,
        pix_fmt=args.pix_fmt,
        labels=args.labels,
        prefix=args.prefix,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
        overwrite=args.overwrite,
        progress=True,
    )
    print(summary)


def make_synthetic(args: argparse.Namespace) -> None:
    from dforce.synthetic import write_bouncing_balls

    shards = write_bouncing_balls(
        args.out,
        args.clips,
        args.frames,
        args.size,
        args.balls,
        args.seed,
        fps=args.fps,
        prefix=args.prefix,
        maxcount=args.maxcount,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.clips} clips to {len(shards)} shards in {args.out}")


def train(args: argparse.Namespace) -> None:
    from dforce.config import load_config
    from dforce.train import train

    model = train(load_config(args.config, args.overrides))
    print(f"model written to {model}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dforce", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    plot = commands.add_parser(
        "plot-weights",
        help="heatmaps of trajectory weightings",
        description="Two frames: exact edge probabilities over the K x K grid. More frames: the sampled "
        "distribution of the level at which each frame is trained.",
    )
    plot.add_argument("--frames", type=int, default=2)
    plot.add_argument("--levels", type=int, default=16, help="diffusion levels K")
    plot.add_argument("--cube-levels", type=int, default=None, help="coarser cube resolution (default K)")
    plot.add_argument(
        "--weightings",
        default=DEFAULT_WEIGHTINGS,
        help="comma-separated names; 'mixture' is paths+teacher at 1:1",
    )
    plot.add_argument("--samples", type=int, default=100_000, help="samples per weighting (frames > 2)")
    plot.add_argument("--out", default="outputs/weights.png")
    plot.set_defaults(run=plot_weights)

    shards = commands.add_parser(
        "make-shards",
        help="video files and folders -> webdataset shards",
        description="One sample per video, or per clip with --clip-frames: the video bytes and a json "
        "record (source, fps, frames, size, and the fields of a sidecar VIDEO.json or a --labels CSV). "
        "Clips, --size and --reencode write H.264 mp4; otherwise the file is kept as it is, once it "
        "decodes. Unreadable, too short and empty videos are skipped and listed at the end.",
    )
    shards.add_argument(
        "inputs", nargs="+", help="video files (any container decord reads) and folders of them"
    )
    shards.add_argument("--out", required=True, help="output folder")
    shards.add_argument(
        "--clip-frames", type=int, default=None, help="cut every video into clips of N frames"
    )
    shards.add_argument("--stride", type=int, default=None, help="frames between clip starts (default N)")
    shards.add_argument("--size", default=None, help="N: short side N, aspect kept; HxW: scale, centre-crop")
    shards.add_argument("--reencode", action="store_true", help="re-encode even without clips or --size")
    shards.add_argument("--crf", type=int, default=12, help="H.264 quality, 0 (lossless) .. 51")
    shards.add_argument(
        "--pix-fmt",
        default="yuv444p",
        choices=["yuv444p", "yuv420p"],
        help="yuv420p plays everywhere, even sizes",
    )
    shards.add_argument(
        "--labels",
        default=None,
        help="CSV with a header path,label[,...]; paths relative to the CSV. A sidecar VIDEO.json "
        '({"label": 3, "actions": [[...] per frame]}) is read as well.',
    )
    shards.add_argument("--prefix", default="train", help="shards are PREFIX-000000.tar, ...")
    shards.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    shards.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    shards.add_argument(
        "--overwrite", action="store_true", help="delete PREFIX-*.tar shards already in --out"
    )
    shards.set_defaults(run=make_shards)

    synthetic = commands.add_parser(
        "make-synthetic",
        help="bouncing-balls shards, the built-in dataset",
        description="Coloured balls with elastic collisions, encoded as H.264; every ball's position and "
        "velocity per frame is in the json record. Deterministic by seed.",
    )
    synthetic.add_argument("--out", default="outputs/data/bouncing_balls")
    synthetic.add_argument("--clips", type=int, default=512)
    synthetic.add_argument("--frames", type=int, default=32, help="frames per clip")
    synthetic.add_argument("--size", type=int, default=32, help="frame side in pixels (32 or 64 are usual)")
    synthetic.add_argument("--balls", type=int, default=3)
    synthetic.add_argument("--seed", type=int, default=0, help="use another seed for a held-out split")
    synthetic.add_argument("--fps", type=float, default=10.0)
    synthetic.add_argument("--prefix", default="train")
    synthetic.add_argument("--maxcount", type=int, default=256, help="clips per shard")
    synthetic.add_argument("--overwrite", action="store_true")
    synthetic.set_defaults(run=make_synthetic)

    training = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from CONFIG (see configs/), with dotted overrides such as train.max_steps=200. "
        "Running the same command again resumes from the newest checkpoint in output_dir. For several "
        "processes: accelerate launch [--multi_gpu --num_processes N] -m dforce train CONFIG ...",
    )
    training.add_argument("config", help="YAML config file")
    training.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=200")
    training.set_defaults(run=train)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, DforceError) as error:
        sys.exit(f"dforce {args.command}: {error}")


if __name__ == "__main__":
    main()
