"""Benchmarks, one subcommand each: every one prints a table, or with --json one JSON object per figure.

    python tools/bench.py data                     # loader clips/s per worker vs plain decord
    python tools/bench.py data --sizes 64 --json   # machine-readable, with machine, torch and date
    python tools/bench.py model                    # parameters, forward and backward time, vs the yardstick
    python tools/bench.py rollout                  # time per generated frame, KV-cached vs recomputed window

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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import decord
import numpy as np
import torch

from dforce.data import DataConfig, make_loader, read_samples
from dforce.model import CausalVideoTransformer
from dforce.noise import NoiseSchedule
from dforce.sampler import History, Sampler, chunk_schedule, denoise_chunk
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


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


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
    cells = [[_cell(f.get(c, "")) for c in columns] for f in figures]
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
            config = DataConfig(sink.shards, clip_frames=args.frames, num_workers=0)
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
                    len(batch["key"]) for batch in make_loader(config, batch_size=args.batch_size)
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


YARDSTICK = Path(__file__).resolve().parents[1].parent / "shared/bench/yardstick.py"

# tiny: the yardstick's CPU shape (d256 L4 h4, 8 frames x 64 tokens, batch 4); base: its GPU shape's
# ~130M-parameter model (d768 L12 h12, 16 frames x 256 tokens), at batch 1 on a CPU.
MODEL_SHAPES = {
    "tiny": dict(
        in_channels=3, sample_size=32, patch_size=4, num_frames=8,
        num_layers=4, num_attention_heads=4, attention_head_dim=64,
    ),
    "base": dict(
        in_channels=4, sample_size=32, patch_size=2, num_frames=16,
        num_layers=12, num_attention_heads=12, attention_head_dim=64,
    ),
}  # fmt: skip


def useful_flops(model: CausalVideoTransformer, batch: int) -> float:
    """Forward FLOPs counted as the yardstick counts them: the block linears per token, and the
    block-causal part of attention."""
    config = model.config
    d, frames = config.num_attention_heads * config.attention_head_dim, config.num_frames
    tokens = frames * model.grid[0] * model.grid[1]
    linears = config.num_layers * 18 * d * d  # qkv 3, out 1, MLP 8, modulation 6 (x d^2)
    attention = config.num_layers * 4 * batch * tokens**2 * d * (frames + 1) / (2 * frames)
    return 2 * batch * tokens * linears + attention


def yardstick_best(device: str) -> dict | None:
    """The yardstick's fastest variant on this machine, run in the same command; None if it is absent."""
    if not YARDSTICK.is_file():
        return None
    done = subprocess.run(
        [sys.executable, str(YARDSTICK), "--device", device, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return max((line for line in lines if "tflops" in line), key=lambda line: line["tflops"], default=None)


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    """Fastest wall time of `repeat` runs after one warm-up run."""
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def model_seconds(
    model: CausalVideoTransformer, sample: torch.Tensor, timesteps: torch.Tensor, backward: bool, repeat: int
) -> float:
    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = model(sample, timesteps)
        if backward:
            out.square().mean().backward()
        if sample.device.type == "cuda":
            torch.cuda.synchronize()

    return best_seconds(run, repeat)


def bench_model(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures = []
    for name in args.shapes:
        torch.manual_seed(0)
        model = CausalVideoTransformer(**MODEL_SHAPES[name]).to(device)
        batch = args.batch or (4 if name == "tiny" else 1)
        config = model.config
        sample = torch.randn(
            batch,
            config.num_frames,
            config.in_channels,
            *(g * config.patch_size for g in model.grid),
            device=device,
        )  # [B, T, C, H, W]
        timesteps = torch.randint(0, 1000, (batch, config.num_frames), device=device)  # [B, T]
        shape = {"shape": name, "batch": batch, "tokens": config.num_frames * model.grid[0] * model.grid[1]}
        params = sum(p.numel() for p in model.parameters())
        figures.append({"figure": "parameters", "value": params / 1e6, "unit": "M", **shape})

        flops = useful_flops(model, batch)
        for backward in (False, True) if args.backward else (False,):
            seconds = model_seconds(model, sample, timesteps, backward, args.repeat)
            figure, factor = ("forward+backward", 3) if backward else ("forward", 1)
            figures.append({"figure": f"{figure} time", "value": seconds * 1e3, "unit": "ms", **shape})
            figures.append(
                {
                    "figure": f"{figure} TFLOP/s",
                    "value": factor * flops / seconds / 1e12,
                    "unit": "TFLOP/s",
                    **shape,
                }
            )
        if name == "tiny" and args.backward and args.yardstick:
            best = yardstick_best(device.type)
            if best is not None:
                ours = figures[-1]["value"]
                figures.append(
                    {
                        "figure": f"yardstick {best['variant']} TFLOP/s",
                        "value": best["tflops"],
                        "unit": "TFLOP/s",
                        **shape,
                    }
                )
                figures.append(
                    {
                        "figure": "forward+backward / yardstick",
                        "value": ours / best["tflops"],
                        "unit": "x",
                        **shape,
                    }
                )
    return figures


# Small frames (8x8 pixels, 16 tokens): per-frame overheads are small, so the figures show how the work
# grows with the frames attended.
ROLLOUT_SHAPE = dict(
    in_channels=3, sample_size=8, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=32,
)  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def frame_seconds(
    model: CausalVideoTransformer, use_cache: bool, prefill: int, args: argparse.Namespace, batch: int
) -> float:
    """Seconds per frame of an autoregressive rollout after `prefill` frames of history (written a frame at a
    time, as a rollout writes them, untimed)."""
    schedule = NoiseSchedule.from_name("cosine", 1000)
    matrix, window = chunk_schedule(model, schedule.levels, "autoregressive", args.steps)
    history = History(model, schedule, "v", window, use_cache=use_cache)
    shape = (batch, 1, model.config.in_channels, *(g * model.config.patch_size for g in model.grid))
    for _ in range(prefill):
        history.commit(torch.randn(shape, device=model.device))
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(args.measure):
        denoise_chunk(history, torch.randn(shape, device=model.device), matrix, Sampler("ddim"))
    _sync(model.device)
    return (time.perf_counter() - start) / args.measure


def bench_rollout(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures = []
    for horizon in args.horizons or [16, max(args.at) + args.measure]:
        torch.manual_seed(0)
        model = CausalVideoTransformer(**ROLLOUT_SHAPE, num_frames=horizon).to(device).eval()
        for batch in args.batch:
            for mode in "cached", "recompute":
                common = {"horizon": horizon, "mode": mode, "batch": batch, "steps": args.steps}
                frame_seconds(model, mode == "cached", min(args.at), args, batch)  # warm-up
                seconds = {}
                for at in args.at:
                    seconds[at] = min(
                        frame_seconds(model, mode == "cached", at, args, batch) for _ in range(args.repeat)
                    )
                    figure = {"figure": "time per frame", "value": seconds[at] * 1e3, "unit": "ms"}
                    figures.append({**figure, **common, "frame": at})
                first, last = min(args.at), max(args.at)
                ratio = seconds[last] / seconds[first]
                figures.append(
                    {"figure": f"frame {last} / frame {first}", "value": ratio, "unit": "x", **common}
                )
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
    model = commands.add_parser(
        "model",
        help="parameters, forward and forward+backward time of the transformer",
        description="CausalVideoTransformer at the yardstick's shapes, block-causal, fp32, best of --repeat "
        "runs. At the tiny (yardstick CPU) shape the forward+backward useful TFLOP/s, counted as the "
        "yardstick counts them, is also given as a ratio to the yardstick's best line from the same command "
        f"({YARDSTICK}, when present).",
    )
    model.add_argument("--shapes", nargs="+", choices=list(MODEL_SHAPES), default=list(MODEL_SHAPES))
    model.add_argument("--batch", type=int, default=None, help="default: 4 for tiny, 1 for base")
    model.add_argument("--repeat", type=int, default=3, help="timed runs; the fastest counts")
    model.add_argument("--no-backward", dest="backward", action="store_false", help="time the forward only")
    model.add_argument("--no-yardstick", dest="yardstick", action="store_false", help="skip the yardstick")
    model.set_defaults(run=bench_model)
    rollout = commands.add_parser(
        "rollout",
        help="time per generated frame at several frame indices, KV-cached vs recomputed window",
        description="Autoregressive rollout (one frame per block, DDIM, --steps denoising steps per "
        "frame) of a tiny random model (d64, 2 layers, 8x8 frames of 16 tokens). At each frame index the "
        "history is filled with that many frames (untimed), then --measure frames are generated: with the KV "
        "cache (steps + 1 one-frame forwards: the steps and the write of the finished frame) or recomputing "
        "the window (steps forwards of every frame in it). Best of --repeat after a warm-up. Two horizons "
        "by default: 16, where the window slides past frame 16, and one past the last --at, where it never "
        "slides and every earlier frame is attended.",
    )
    rollout.add_argument("--at", type=int, nargs="+", default=[16, 64, 256], help="frame indices")
    rollout.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    rollout.add_argument(
        "--horizons",
        type=int,
        nargs="+",
        default=None,
        help="model horizons (default: 16 and past the last --at)",
    )
    rollout.add_argument("--steps", type=int, default=4, help="denoising steps per frame")
    rollout.add_argument("--measure", type=int, default=2, help="frames timed at each index")
    rollout.add_argument("--repeat", type=int, default=2, help="timed runs; the fastest counts")
    rollout.set_defaults(run=bench_rollout)
    for command in commands.choices.values():
        command.add_argument("--json", action="store_true", help="one JSON object per figure")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    report(args.run(args), argv, args.json)


if __name__ == "__main__":
    main()
