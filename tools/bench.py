"""Benchmarks, one subcommand each: every one prints a table, or with --json one JSON object per figure.

    python tools/bench.py data                     # loader clips/s per worker vs plain decord
    python tools/bench.py data --sizes 64 --json   # machine-readable, with machine, torch and date

Each figure carries the command line, the machine, the torch version and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import decord
import numpy as np
import torch

from dforce.data import DataConfig, make_loader, read_samples
from dforce.shards import ShardSink, encode_video
from dforce.synthetic import bouncing_balls


def machine() -> str:
    """CPU model and cores, and the GPU if there is one."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    text = (
        f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"
    )
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def report(figures: list[dict], argv: list[str], as_json: bool) -> None:
    """Figures are dicts with `figure`, `value`, `unit` and their parameters."""
    context = {
        "command": " ".join(["tools/bench.py", *argv]),
        "machine": machine(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if as_json:
        for figure in figures:
            print(json.dumps({**figure, **context}))
        return
    columns = list(dict.fromkeys(key for figure in figures for key in figure))
    cells = [
        [f"{f.get(c, ''):.1f}" if isinstance(f.get(c), float) else str(f.get(c, "")) for c in columns]
        for f in figures
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    for row in [columns, ["-" * w for w in widths], *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"\n{context['machine']}; torch {context['torch']}; {context['date']}")


def textured_clip(index: int, frames: int, size: int) -> np.ndarray:
    """Bouncing balls over a panning smooth-noise background, so the decoder has real residuals to decode."""
    balls, _ = bouncing_balls(index, frames, size, num_balls=3, seed=index)
    rng = np.random.default_rng(index)
    noise = (
        rng.uniform(0, 120, (size // 4 + frames, size // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)
    )  # [H', W', 3]
    background = np.stack([noise[t : t + size, :size] for t in range(frames)])  # [T, H, W, 3], panning down
    return np.maximum(balls, background.astype(np.uint8))


def best_rates(runs: dict[str, Callable[[], int]], repeat: int) -> dict[str, float]:
    """Clips per CPU second (this process's CPU time, which other load on the machine disturbs less than
    wall time) of the fastest of `repeat` runs of each, interleaved so that drifts hit them alike; the
    first round warms up and does not count."""
    best = dict.fromkeys(runs, 0.0)
    for round in range(repeat + 1):
        for name, run in runs.items():
            start = time.process_time()
            clips = run()
            if round > 0:
                best[name] = max(best[name], clips / (time.process_time() - start))
    return best


def bench_data(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)  # as in a DataLoader worker
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            with ShardSink(Path(tmp) / str(size), maxcount=args.videos // 4 or 1) as sink:
                for i in range(args.videos):
                    video = encode_video(
                        textured_clip(i, args.video_frames, size), 25, crf=23, pix_fmt="yuv420p"
                    )
                    sink.write({"__key__": f"{i:06d}", "mp4": video, "json": {"fps": 25}})
            files = [sample["mp4"] for sample in read_samples(sink.shards)]
            config = DataConfig(
                sink.shards, clip_frames=args.frames, batch_size=args.batch_size, num_workers=0
            )
            configs = {"loader": config, "loader uint8": dataclasses.replace(config, pixels="uint8")}

            def plain_decord(files=files) -> int:
                rng = np.random.default_rng(0)
                for data in files:
                    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
                    start = int(rng.integers(len(reader) - args.frames + 1))
                    reader.get_batch(list(range(start, start + args.frames))).asnumpy()
                return len(files)

            runs = {"decord": plain_decord}
            for name, loader_config in configs.items():
                runs[name] = lambda config=loader_config: sum(
                    len(batch["key"]) for batch in make_loader(config)
                )
            rates = best_rates(runs, args.repeat)
            common = {"size": f"{size}x{size}", "frames": args.frames}
            for name, rate in rates.items():
                figures.append(
                    {"figure": f"{name} clips/s/worker", "value": rate, "unit": "clips/s", **common}
                )
            for name in configs:
                overhead = 100 * (1 - rates[name] / rates["decord"])
                figures.append({"figure": f"{name} overhead", "value": overhead, "unit": "%", **common})
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser(
        "data",
        help="loader throughput vs plain decord",
        description="Clips per CPU second for one worker (one process, one thread): the dforce loader (tar "
        "reading, shuffle buffer, decode, batching; float32 in [-1, 1] or uint8) against plain decord "
        "decoding of the same files from memory. Videos are made in a temporary folder: H.264 4:2:0, crf 23.",
    )
    data.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="frame sides")
    data.add_argument("--frames", type=int, default=16, help="frames per clip")
    data.add_argument("--videos", type=int, default=64, help="videos per size")
    data.add_argument("--video-frames", type=int, default=48, help="frames per video")
    data.add_argument("--batch-size", type=int, default=8)
    data.add_argument("--repeat", type=int, default=3, help="runs per figure; the fastest counts")
    data.set_defaults(run=bench_data)
    for command in commands.choices.values():
        command.add_argument("--json", action="store_true", help="one JSON object per figure")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    report(args.run(args), argv, args.json)


if __name__ == "__main__":
    main()
