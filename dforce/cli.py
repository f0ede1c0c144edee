"""`dforce COMMAND ...`: one entry point for every job."""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ValueError as error:
        sys.exit(f"dforce {args.command}: {error}")


if __name__ == "__main__":
    main()
