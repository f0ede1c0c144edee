"""Benchmarks, one subcommand each: every one prints a table, or with --json one JSON object per figure.

    python tools/bench.py data                     # loader clips/s per worker vs plain decord
    python tools/bench.py data --sizes 64 --json   # machine-readable, with machine, torch and date
    python tools/bench.py train                    # the training step's useful TFLOP/s vs the yardstick's
    python tools/bench.py train --backbone wan     # the same for a Wan transformer of the same shape
    python tools/bench.py memory                   # peak memory of a step, with and without checkpointing
    python tools/bench.py memory --backbone wan    # the same, and Wan's activation bytes per token and layer
    python tools/bench.py scale                    # memory per GPU under FSDP, ours and Wan 1.3B / 14B
    python tools/bench.py rollout                  # time per generated frame, KV-cached vs recomputed window
    python tools/bench.py vae                      # encode clips/s, decode ms/frame, decode memory vs length

Each figure carries the command line, the machine, the torch version and the date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.util
import inspect
import io
import json
import os
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import diffusers
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from dforce.data.clips import DataConfig, resize_crop
from dforce.data.decode import decode_video
from dforce.data.encode_latents import encode_latents
from dforce.data.loader import make_loader, to_float
from dforce.data.reading import read_samples
from dforce.data.shards import ShardSink, encode_video
from dforce.data.synthetic import bouncing_balls
from dforce.data.vae import decode, encode, load_vae
from dforce.diffusion.history import History
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.rollout import chunk_schedule, denoise_chunk
from dforce.diffusion.sampler import Sampler
from dforce.models.backbone import Backbone, build_model
from dforce.models.lora import LoraConfig, add_lora, default_targets, lora_module
from dforce.models.model import CausalVideoTransformer
from dforce.models.wan import CausalWan
from dforce.training.config import Config, TrainConfig, model_kwargs
from dforce.training.ema import EMA
from dforce.training.engine import make_loss
from dforce.training.objectives.denoising import Denoising
from dforce.training.run_record import Start
from dforce.training.trainer import Trainer


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


def write_videos(folder: Path, videos: int, frames: int, size: int, maxcount: int) -> list[str]:
    """`videos` textured clips as webdataset shards of H.264 4:2:0 mp4s (crf 23, 25 fps) in `folder`."""
    with ShardSink(folder, maxcount=maxcount) as sink:
        for i in range(videos):
            video = encode_video(textured_clip(i, frames, size), 25, crf=23, pix_fmt="yuv420p")
            sink.write({"__key__": f"{i:06d}", "mp4": video, "json": {"fps": 25}})
    return sink.shards


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
    import decord  # here only: the rest of bench (and tools/gpu_check.py) runs where decord is absent

    torch.set_num_threads(1)  # as in a DataLoader worker
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shards = write_videos(
                Path(tmp) / str(size), args.videos, args.video_frames, size, args.videos // 4 or 1
            )
            files = [sample["mp4"] for sample in read_samples(shards)]
            config = DataConfig(shards, clip_frames=args.frames, num_workers=0)
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

# The yardstick's shapes as video models, with its batch and precision. CPU: d256 L4 h4, 8 frames x 64
# tokens (32x32 RGB, patch 4), batch 4, fp32. GPU: d768 L12 h12 (~130M parameters), 16 frames x 256
# tokens (32x32 latents of 4 channels, patch 2), batch 8, bf16.
TRAIN_SHAPES = {
    "cpu": (
        dict(in_channels=3, sample_size=32, patch_size=4, num_frames=8,
             num_layers=4, num_attention_heads=4, attention_head_dim=64),
        4,
        "no",
    ),
    "cuda": (
        dict(in_channels=4, sample_size=32, patch_size=2, num_frames=16,
             num_layers=12, num_attention_heads=12, attention_head_dim=64),
        8,
        "bf16",
    ),
}  # fmt: skip
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wan_section(shape: dict[str, int]) -> dict:
    """The `model` section of `backbone: wan` at a shape of ours (`--backbone wan`): a random
    WanTransformer3DModel of the same width, heads, depth and patch, its FFN 4d as our MLP unless the shape
    names an `ffn_dim`, no text (one zero token to cross-attend)."""
    d, side = shape["num_attention_heads"] * shape["attention_head_dim"], shape["sample_size"]
    config = {key: shape[key] for key in ("num_attention_heads", "attention_head_dim", "num_layers")}
    ffn = shape.get("ffn_dim", 4 * d)
    config |= dict(patch_size=(1, shape["patch_size"], shape["patch_size"]), ffn_dim=ffn, text_dim=64)
    config |= dict(in_channels=shape["in_channels"], out_channels=shape["in_channels"])
    return {"backbone": "wan", "sample_size": (side, side), "text": False, "config": config}


def model_shape(model: Backbone) -> dict[str, int]:
    """Width d, heads h, layers, frames and tokens per frame (tpf) of either backbone, as the yardstick
    names them."""
    config = model.transformer.config if isinstance(model, CausalWan) else model.config
    return dict(
        d=config.num_attention_heads * config.attention_head_dim,
        h=config.num_attention_heads,
        layers=config.num_layers,
        frames=model.horizon,
        tpf=model.grid[0] * model.grid[1],
    )


def useful_flops(model: Backbone, batch: int) -> float:
    """Forward FLOPs counted as the yardstick counts them: the block linears per token, the adaLN
    modulation's 6d^2 per token included (both backbones compute it once per frame; the yardstick's block
    computes it per token), and the block-causal part of attention. Wan's block also has its own
    cross-attention's query and output projections (2d^2 per token; its keys and values are of the text)
    and its FFN of ffn_dim."""
    shape = model_shape(model)
    d, frames, layers = shape["d"], shape["frames"], shape["layers"]
    tokens = frames * shape["tpf"]
    if isinstance(model, CausalWan):  # self-attention 4, cross-attention's q and out 2, modulation 6 (x d^2)
        linears = layers * (12 * d * d + 2 * d * model.transformer.config.ffn_dim)
    else:
        linears = layers * 18 * d * d  # qkv 3, out 1, MLP 8, modulation 6 (x d^2)
    attention = layers * 4 * batch * tokens**2 * d * (frames + 1) / (2 * frames)
    return 2 * batch * tokens * linears + attention


def bench_config(args: argparse.Namespace, device: torch.device, checkpointing: bool = False) -> Config:
    """A training config at the yardstick's shape for `device` (with --model overrides): the default
    `paths` trajectories (every frame at its own level, one block-causal forward of the clip), cosine
    noise, v-prediction, AdamW, EMA."""
    shape, batch, precision = TRAIN_SHAPES[device.type]
    model = {**shape, **dict(item.split("=", 1) for item in args.model)}
    model = {key: int(value) for key, value in model.items()}
    frames = model.pop("num_frames")
    if getattr(args, "backbone", "dforce") == "wan":
        model = wan_section(model)
    train = TrainConfig(
        max_steps=1,
        checkpoint_every=1,
        lora=LoraConfig(rank=args.lora) if getattr(args, "lora", None) else None,
        batch_size=args.batch or batch,
        mixed_precision=args.mixed_precision or precision,
        gradient_checkpointing=checkpointing,
        compile=args.compile,
        trackers=[],
    )
    data = DataConfig(shards=[], clip_frames=frames)
    return Config(output_dir="", seed=0, train=train, data=data, model=model)


def training_step(config: Config, device: torch.device) -> tuple[Callable[[int], None], Backbone]:
    """One optimiser step of `dforce train` on a fixed batch, as its loop runs it: the denoising
    objective's step (trajectory sampling, noising, forward, loss, backward, loss meter, clipping, fused
    AdamW) and the loop's EMA update; `dforce.training.trainer` without the data loader, whose cost `bench.py
    data` measures."""
    cfg = config.train
    trainer = Trainer(config, Start())  # a fresh run: nothing loaded, nothing moved
    objective = Denoising(config, trainer)
    ema = EMA(objective.model.parameters(), decay=cfg.ema_decay, foreach=True)
    net = trainer.accelerator.unwrap_model(objective.model)
    shape = (cfg.batch_size, config.data.clip_frames, *net.frame_shape)
    video = torch.randint(0, 256, shape, dtype=torch.uint8)  # [B, T, C, H, W], as the loader gives it
    if device.type == "cuda":
        video = video.pin_memory()

    def batches() -> Iterator[dict]:
        while True:
            yield {"video": to_float(video.to(device, non_blocking=True)), "skipped": 0}

    stream = batches()

    def step(index: int) -> None:
        if objective.step(index, stream).isfinite():
            ema.step(objective.model.parameters())

    return step, net


def load_yardstick(clock: Callable[[], float]) -> types.ModuleType | None:
    """The yardstick module, timed by `clock`; None if its file is absent."""
    if not YARDSTICK.is_file():
        return None
    spec = importlib.util.spec_from_file_location("yardstick", YARDSTICK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.time = types.SimpleNamespace(perf_counter=clock)  # its one use of `time`
    return module


def yardstick_variants(
    model: Backbone, batch: int, bf16: bool, device: torch.device, args: argparse.Namespace
) -> dict[str, Callable[[], tuple[float, float]]]:
    """The yardstick's variants as its main runs them, at this model's shape: name -> () -> (ms per
    step, its useful TFLOP/s)."""
    yardstick = load_yardstick(CLOCKS[args.clock]) if args.yardstick else None
    if yardstick is None:
        return {}
    shape = model_shape(model) | dict(batch=batch, dtype="bfloat16" if bf16 else "float32")
    return {
        f"{mode}{' compiled' if compiled else ''}": functools.partial(
            yardstick.run, device.type, **shape, mode=mode, compile_=compiled, steps=args.steps
        )
        for mode in ("sdpa_full", "sdpa_mask", "flex")
        for compiled in ((False, True) if device.type == "cuda" else (False,))
    }


def bench_train(args: argparse.Namespace) -> list[dict]:
    """Rounds of: --steps training steps, --steps forward+backward passes of the bare model, and each
    yardstick variant; the fastest round of each counts, so that load from elsewhere hits them alike."""
    device = _device()
    config = bench_config(args, device)
    step, model = training_step(config, device)
    batch = config.train.batch_size
    sample = torch.randn(batch, model.horizon, *model.frame_shape, device=device)
    timesteps = torch.randint(0, 1000, sample.shape[:2], device=device)
    bf16 = config.train.mixed_precision == "bf16"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def forward_backward(index: int) -> None:
        with autocast:
            out = model(sample, timesteps)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    clock = CLOCKS[args.clock]

    def ms(run: Callable[[int], None]) -> float:
        _sync(device)
        start = clock()
        for index in range(args.steps):
            run(index)
        _sync(device)
        return (clock() - start) / args.steps * 1e3

    for index in range(2):  # warm-up (and compilation)
        step(index)
        forward_backward(index)
    variants = yardstick_variants(model, batch, bf16, device, args)
    best: dict[str, tuple[float, float]] = {}
    failed: dict[str, str] = {}
    for _ in range(args.repeat):
        for name, run in {"step": step, "forward+backward": forward_backward}.items():
            best[name] = min(best.get(name, (float("inf"),)), (ms(run), 0.0))
        for name, run in variants.items():
            if name in failed:
                continue
            try:
                best[name] = min(best.get(name, (float("inf"),)), run())
            except Exception as error:  # as the yardstick does: one failing variant does not hide the rest
                failed[name] = type(error).__name__
    common = {
        "backbone": args.backbone,
        "device": device.type,
        "batch": batch,
        "dtype": "bf16" if bf16 else "fp32",
    }
    flops = 3 * useful_flops(model, batch)
    params = sum(p.numel() for p in model.parameters())
    figures = [{"figure": "parameters", "value": params / 1e6, "unit": "M", **common}]
    for name in "step", "forward+backward":
        figures.append({"figure": f"{name} time", "value": best[name][0], "unit": "ms", **common})
    overhead = 100 * (best["step"][0] / best["forward+backward"][0] - 1)
    figures.append({"figure": "step beyond forward+backward", "value": overhead, "unit": "%", **common})
    ours = flops / best["step"][0] / 1e9
    figures.append({"figure": "step useful TFLOP/s", "value": ours, "unit": "TFLOP/s", **common})
    for name in variants:
        if name in failed:
            figures.append({"figure": f"yardstick {name}", "value": "failed", "unit": failed[name], **common})
        else:
            figures.append(
                {"figure": f"yardstick {name} TFLOP/s", "value": best[name][1], "unit": "TFLOP/s", **common}
            )
    if args.yardstick and not variants:  # said, not silently left out: no ratio without the reference
        figures.append({"figure": "yardstick", "value": "absent", "unit": str(YARDSTICK), **common})
    ran = [name for name in variants if name not in failed]
    if ran:
        top = max(ran, key=lambda name: best[name][1])
        ratio = ours / best[top][1]
        figures.append({"figure": f"step / yardstick best ({top})", "value": ratio, "unit": "x", **common})
    return figures


def step_peak_bytes(config: Config, device: torch.device) -> int:
    """Peak bytes allocated during one training step (after a warm-up step) above what was live before
    it: CUDA's allocator statistics on a GPU; on a CPU the torch profiler's allocations and frees, summed
    in time order over the top-level operations."""
    step, _ = training_step(config, device)
    step(0)
    _sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(1)
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_bytes(lambda: step(1))


def cpu_peak_bytes(run: Callable[[], object]) -> int:
    """Peak bytes allocated on the CPU while `run` runs, above what was live before it: the torch
    profiler's allocations and frees, summed in time order over the top-level operations (frees outside
    any operation come as top-level `[memory]` events), so a peak inside one operation is not seen."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def bench_memory(args: argparse.Namespace) -> list[dict]:
    device = _device()
    figures, peaks = [], {}
    for checkpointing in False, True:
        config = bench_config(args, device, checkpointing)
        peaks[checkpointing] = step_peak_bytes(config, device)
        common = {"device": device.type, "batch": config.train.batch_size, "checkpointing": checkpointing}
        figures.append(
            {"figure": "step peak memory", "value": peaks[checkpointing] / 2**20, "unit": "MiB", **common}
        )
    ratio = peaks[True] / peaks[False]
    figures.append({"figure": "checkpointed / plain", "value": ratio, "unit": "x", "device": device.type})
    config = bench_config(args, device)
    batch = config.train.batch_size
    saved = {size: saved_bytes(config, device, size) for size in (batch, 2 * batch)}
    shape = model_shape(build_model(model_kwargs(config)))
    tokens = batch * shape["frames"] * shape["tpf"]
    per_layer = (saved[2 * batch] - saved[batch]) / tokens / shape["layers"]
    dtype = "bf16 autocast" if config.train.mixed_precision == "bf16" else "fp32"
    common = {"backbone": args.backbone, "d": shape["d"], "dtype": dtype, "lora": args.lora or "no"}
    if args.backbone == "wan":
        common["ffn"] = config.model["config"]["ffn_dim"]
    figures.append(
        {"figure": "saved for backward per token and layer", "value": per_layer, "unit": "bytes", **common}
    )
    figures.append(
        {
            "figure": "saved for backward per token and layer / d",
            "value": per_layer / shape["d"],
            "unit": "bytes/d",
            **common,
        }
    )
    return figures


def saved_bytes(config: Config, device: torch.device, batch: int) -> int:
    """Bytes of the tensors one training forward of `batch` clips keeps for the backward, each storage
    once. The growth from one batch to another is the activations without checkpointing (weights and
    autocast's copies of them do not grow with the batch)."""
    torch.manual_seed(config.seed)
    model = build_model(model_kwargs(config)).to(device)
    if config.train.lora is not None:
        add_lora(model, config.train.lora)
    loss_fn = make_loss(config, config.trajectory.name, model.frames_per_block)
    x0 = torch.rand(batch, config.data.clip_frames, *model.frame_shape) * 2 - 1
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    bf16 = config.train.mixed_precision == "bf16"
    with (
        torch.autocast(device.type, torch.bfloat16, enabled=bf16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        loss_fn(model, x0.to(device), seed=0)
    return sum(storages.values())


# Memory per GPU under FSDP (`scale`): the models, their shapes of tokens, and the bytes the `memory`
# subcommand measured. Ours: d, layers, heads (x 128, or 64 for the 100M), as BENCHMARKS.md's table; Wan:
# the published configs of Wan2.1-T2V-1.3B and -14B (diffusers' WanTransformer3DModel).
SCALE_OURS = {
    "ours ~100M": dict(num_layers=14, num_attention_heads=10, attention_head_dim=64),
    "ours ~1B": dict(num_layers=24, num_attention_heads=12, attention_head_dim=128),
    "ours ~5B": dict(num_layers=30, num_attention_heads=24, attention_head_dim=128),
}
SCALE_WAN = {
    "Wan2.1 1.3B": dict(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
    "Wan2.1 14B": dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
}
WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
GIB = 2**30
WAN_BYTES = [100.0, 4.0]  # Wan, bf16 autocast: bytes per token and layer = A x d + B x ffn_dim (`memory`)


def lora_parameters(model: torch.nn.Module, rank: int) -> int:
    """Parameters of rank-`rank` adapters on the backbone's default LoRA targets (`dforce.models.lora`):
    r(in + out) per adapted linear, matched as peft matches them."""
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    root = lora_module(model)[1]
    targets = default_targets(root)
    config = peft.LoraConfig(target_modules=list(targets))
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in root.named_modules()
        if isinstance(module, torch.nn.Linear) and check_target_module_exists(config, name)
    )


def scale_row(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    frames: int,
    tpf: int,
    per_token_layer: float,
    lora: int | None,
    once_per_token: float = 0.0,
) -> dict:
    """One row of the memory-per-GPU table (bytes -> GiB), batch 1 per GPU, bf16 autocast, `args.gpus`-way
    FSDP with one unit per block. `per_token_layer`: bytes a forward keeps per token and layer (`memory`);
    `once_per_token`: bytes per token kept once for all layers (Wan's per-token modulation)."""
    blocks = model.transformer.blocks if hasattr(model, "transformer") else model.blocks
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in blocks[0].parameters())
    layers = len(blocks)
    d = model_shape(model)["d"]
    tokens = frames * tpf
    if lora is None:
        trainable = params
        sharded = 20 * params / args.gpus  # fp32 weights 4, gradients 4, AdamW 8, EMA 4
        gathered = 2 * 4 * block  # the block in use and the one prefetched: bf16 weights and gradients
    else:
        trainable = lora_parameters(model, lora)
        # the frozen base as dforce keeps it under FSDP2 (fp32: --lora-base-bytes 4); the adapters as above
        sharded = (args.lora_base_bytes * params + 20 * trainable) / args.gpus
        gathered = 2 * 2 * block  # bf16 weights of two blocks; no gradients of the base
    plain = tokens * layers * per_token_layer + tokens * once_per_token
    checkpointed = tokens * layers * 2 * d + tokens * per_token_layer + tokens * once_per_token
    return {
        "figure": "memory per GPU",
        "model": name,
        "params M": params / 1e6,
        "trainable M": trainable / 1e6,
        "frames": frames,
        "tokens/frame": tpf,
        "state GiB": sharded / GIB,
        "gathered GiB": gathered / GIB,
        "act plain GiB": plain / GIB,
        "act ckpt GiB": checkpointed / GIB,
        "value": (sharded + gathered + plain) / GIB,
        "ckpt GiB": (sharded + gathered + checkpointed) / GIB,
        "unit": "GiB",
        "gpus": args.gpus,
        "lora": lora or "no",
    }


def bench_scale(args: argparse.Namespace) -> list[dict]:
    """Memory per GPU under FSDP, computed (not measured on a GPU): parameters counted on the meta device,
    activations from the bytes per token and layer that `memory` measures under bf16 autocast."""
    figures = []
    with torch.device("meta"):
        for name, shape in SCALE_OURS.items():
            model = CausalVideoTransformer(
                in_channels=16, sample_size=32, patch_size=2, num_frames=16, **shape
            )  # 256 tokens a frame: 256x256 video through an 8x VAE, patch 2
            d = model_shape(model)["d"]
            for frames in args.ours_frames:
                figures.append(scale_row(name, model, args, frames, 256, args.ours_bytes * d, None))
        for name, shape in SCALE_WAN.items():
            sizes = (args.wan_size[0] // 2, args.wan_size[1] // 2)
            model = CausalWan(
                transformer_config={**WAN_COMMON, **shape},
                num_frames=args.wan_frames,
                sample_size=tuple(args.wan_size),
            )
            d = model_shape(model)["d"]
            per_layer = args.wan_bytes[0] * d + args.wan_bytes[1] * shape["ffn_dim"]
            once = args.wan_once * d  # the per-token modulation [L, 6, d] in bf16, shared by every block
            for lora in (None, *args.lora_ranks):
                figures.append(
                    scale_row(name, model, args, args.wan_frames, sizes[0] * sizes[1], per_layer, lora, once)
                )
    return figures


# Small frames (8x8 pixels, 16 tokens): per-frame overheads are small, so the figures show how the work
# grows with the frames attended.
ROLLOUT_SHAPE = dict(
    in_channels=3, sample_size=8, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=32,
)  # fmt: skip


@torch.no_grad()
def frame_seconds(
    model: Backbone, use_cache: bool, prefill: int, args: argparse.Namespace, batch: int
) -> float:
    """Seconds per frame of an autoregressive rollout after `prefill` frames of history (written a frame at a
    time, as a rollout writes them, untimed)."""
    schedule = NoiseSchedule.from_name("cosine", 1000)
    matrix, window = chunk_schedule(model, schedule.levels, "autoregressive", args.steps)
    history = History(model, schedule, "v", window, use_cache=use_cache)
    shape = (batch, 1, *model.frame_shape)
    for _ in range(prefill):
        history.commit(torch.randn(shape, device=model.device))
    clock = CLOCKS[args.clock]
    _sync(model.device)
    start = clock()
    for _ in range(args.measure):
        denoise_chunk(history, torch.randn(shape, device=model.device), matrix, Sampler("ddim"))
    _sync(model.device)
    return (clock() - start) / args.measure


def bench_rollout(args: argparse.Namespace) -> list[dict]:
    device = _device()
    figures = []
    for horizon in args.horizons or [16, max(args.at) + args.measure]:
        torch.manual_seed(0)
        section = wan_section(ROLLOUT_SHAPE) if args.backbone == "wan" else ROLLOUT_SHAPE
        model = build_model({**section, "num_frames": horizon}).to(device).eval()
        for batch in args.batch:
            for mode in "cached", "recompute":
                common = {"backbone": args.backbone, "horizon": horizon, "mode": mode, "batch": batch}
                common["steps"] = args.steps
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


# Random VAEs of the two layouts dforce decodes, at the real depths and a quarter (KL) or a sixth (Wan) of
# the real widths: Stable Diffusion's AutoencoderKL (8x in space, 4 latent channels, an image VAE) and
# Wan 2.1's AutoencoderKLWan (4x in time, 8x in space, 16 latent channels, causal 3-D convolutions).
VAE_SHAPES = {
    "kl": ("AutoencoderKL", dict(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 64, 128, 128], layers_per_block=2, latent_channels=4, norm_num_groups=32,
    )),
    "wan": ("AutoencoderKLWan", dict(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        temperal_downsample=[False, True, True],
    )),
}  # fmt: skip
DECODE_CLIPS = 2  # clips whose latents the decode timings decode
CHUNK_FRAMES = inspect.signature(decode).parameters["chunk_frames"].default  # an image VAE's, per call


def vae_kinds(text: str) -> list[str]:
    kinds = text.split(",")
    if unknown := [kind for kind in kinds if kind not in VAE_SHAPES]:
        raise argparse.ArgumentTypeError(f"unknown kind {', '.join(unknown)}; known: {', '.join(VAE_SHAPES)}")
    return kinds


def save_vae(kind: str, folder: Path) -> Path:
    """The random VAE of `kind`, written by save_pretrained as a user's VAE folder is."""
    name, shape = VAE_SHAPES[kind]
    torch.manual_seed(0)
    getattr(diffusers, name)(**shape).save_pretrained(folder)
    return folder


def best_seconds(
    runs: dict[str, Callable[[], object]], repeat: int, clock: Callable[[], float], device: torch.device
) -> dict[str, float]:
    """Seconds of the fastest of `repeat` runs of each, in interleaved rounds so that drifts hit them alike
    (warm-up is the caller's)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            _sync(device)
            start = clock()
            run()
            _sync(device)
            best[name] = min(best[name], clock() - start)
    return best


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated while `run` runs above what was live before: CUDA's allocator peak on a GPU,
    `cpu_peak_bytes` on a CPU."""
    gc.collect()
    if device.type != "cuda":
        return cpu_peak_bytes(run)
    _sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    _sync(device)
    return torch.cuda.max_memory_allocated() - before


def bench_vae(args: argparse.Namespace) -> list[dict]:
    device, clock, size = _device(), CLOCKS[args.clock], args.size
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = write_videos(root / "videos", args.clips, args.frames, size, max(args.clips // 2, 1))
        warm_shards = write_videos(root / "warm", 1, args.frames, size, maxcount=1)
        clips = [  # the pixels the pipeline encodes, read and decoded beforehand
            to_float(resize_crop(decode_video(sample["mp4"]), size)) for sample in read_samples(shards)
        ]
        for kind in args.kind:
            folder = save_vae(kind, root / kind)
            vae, space = load_vae(folder, device=device)  # as the pipeline loads it
            common = {"kind": kind, "vae": space.vae_class, "size": f"{size}x{size}", "device": device.type}

            def pipeline(shards: list[str] = shards, folder: Path = folder) -> None:
                summary = encode_latents(
                    shards, root / "latents", folder, size=size, device=device, overwrite=True
                )
                if summary.skipped:
                    raise RuntimeError(f"encode_latents skipped clips: {summary.skipped}")

            def alone(vae: torch.nn.Module = vae, space=space) -> None:
                for pixels in clips:
                    encode(vae, space, pixels)

            pipeline(warm_shards)  # warm-up: first calls, oneDNN's kernels for these shapes
            encode(vae, space, clips[0])
            seconds = best_seconds({"pipeline": pipeline, "alone": alone}, args.repeat, clock, device)
            encoding = {**common, "frames": args.frames, "clips": args.clips}
            for name, label in ("pipeline", "encode pipeline clips/s"), ("alone", "encode VAE alone clips/s"):
                rate = args.clips / seconds[name]
                figures.append({"figure": label, "value": rate, "unit": "clips/s", **encoding})
            ratio = seconds["pipeline"] / seconds["alone"]
            figures.append({"figure": "encode pipeline / VAE alone", "value": ratio, "unit": "x", **encoding})

            latents = [  # normalized, as a model generates them
                space.normalize(encode(vae, space, pixels)).to(device) for pixels in clips[:DECODE_CLIPS]
            ]
            raw = [space.denormalize(z) for z in latents]  # what the VAE's decoder takes
            raw = [z.permute(1, 0, 2, 3)[None] if space.causal else z for z in raw]  # Wan: [1, c, T', h, w]
            frames = sum(space.pixel_frames(len(z)) for z in latents)

            def ours(vae: torch.nn.Module = vae, space=space, latents: list = latents) -> None:
                for z in latents:
                    decode(vae, space, z)

            @torch.no_grad()
            def direct(vae: torch.nn.Module = vae, raw: list = raw) -> None:
                for z in raw:
                    vae.decode(z)

            ours(latents=latents[:1])  # warm-up
            direct(raw=raw[:1])
            seconds = best_seconds({"dforce": ours, "direct": direct}, args.repeat, clock, device)
            decoding = {**common, "frames": frames}
            for name in seconds:
                ms = seconds[name] / frames * 1e3
                figures.append({"figure": f"decode {name} ms/frame", "value": ms, "unit": "ms", **decoding})
            ratio = seconds["dforce"] / seconds["direct"]
            figures.append({"figure": "decode dforce / direct", "value": ratio, "unit": "x", **decoding})

            side = size // space.spatial_compression
            generator = torch.Generator().manual_seed(0)
            above = {}
            for length in args.lengths:
                z = torch.randn(length, space.channels, side, side, generator=generator).to(device)
                peak = peak_bytes(lambda vae=vae, space=space, z=z: decode(vae, space, z), device)
                pixel_frames = space.pixel_frames(length)
                output = pixel_frames * 3 * size * size * 4  # float32 [T, 3, H, W]
                above[length] = peak - output
                figures.append(
                    {
                        "figure": "decode peak above output",
                        "value": above[length] / 2**20,
                        "unit": "MiB",
                        **common,
                        "latent_frames": length,
                        "pixel_frames": pixel_frames,
                        "peak MiB": peak / 2**20,
                        "output MiB": output / 2**20,
                    }
                )
            pairs = [(max(above), min(above))]
            if not space.causal:  # an image VAE decodes chunks of frames: compare lengths past one chunk
                past = [length for length in above if length >= CHUNK_FRAMES]
                if len(past) > 1 and min(past) != min(above):
                    pairs.append((max(past), min(past)))
            for longest, shortest in pairs:
                ratio = above[longest] / above[shortest]
                figure = f"peak above output, {longest} / {shortest} latents"
                figures.append({"figure": figure, "value": ratio, "unit": "x", **common})
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
    shapes = ", ".join(f"{k}={v}" for k, v in TRAIN_SHAPES["cpu"][0].items())
    train = commands.add_parser(
        "train",
        help="the training step's useful TFLOP/s next to the yardstick's best line",
        description="The training step of `dforce train` (trajectory sampling, noising, forward, loss, "
        "backward, clipping, AdamW, EMA) at the yardstick's shape: on a CPU fp32, batch 4, "
        f"{shapes}; on a GPU bf16, batch 8, the yardstick's d768 L12 h12, 16 frames x 256 tokens. Its useful "
        "TFLOP/s, counted as the yardstick counts them, is set beside each variant of the yardstick "
        f"({YARDSTICK}, imported and run in the same command at the same shape), and as a ratio to the "
        "best. Also: the bare model's forward+backward, and what the rest of the step adds to it.",
    )
    memory = commands.add_parser(
        "memory",
        help="peak memory of a training step with and without activation checkpointing",
        description="Peak memory allocated during one training step (the `train` subcommand's), above "
        "what was live before it (weights, optimiser state, EMA), with and without activation "
        "checkpointing. GPU: CUDA's allocator peak. CPU: the torch profiler's allocations and frees summed "
        "in time order over top-level operations (so a peak inside one operation is not seen).",
    )
    for command in train, memory:
        command.add_argument("--batch", type=int, default=None, help="default: 4 on a CPU, 8 on a GPU")
        command.add_argument(
            "--model", nargs="*", default=[], metavar="KEY=INT", help="override the model shape"
        )
        command.add_argument(
            "--mixed-precision",
            choices=["no", "bf16"],
            default=None,
            help="train.mixed_precision (default: no on a CPU, bf16 on a GPU)",
        )
        command.add_argument(
            "--compile",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="regional torch.compile (train.compile; default: on a GPU only)",
        )
    train.add_argument("--steps", type=int, default=3, help="steps timed per round")
    train.add_argument("--repeat", type=int, default=3, help="rounds; the fastest counts")
    train.add_argument("--no-yardstick", dest="yardstick", action="store_false", help="skip the yardstick")
    train.set_defaults(run=bench_train)
    memory.set_defaults(run=bench_memory)
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
    scale = commands.add_parser(
        "scale",
        help="memory per GPU under FSDP (computed): ours at 100M-5B, Wan 2.1 1.3B and 14B, with LoRA",
        description="Memory per GPU of a training step under FSDP2 (one unit per block), batch 1 per GPU, "
        "bf16 autocast, computed, not measured: parameters counted on the meta device (ours at d640/1536/"
        "3072; Wan 2.1 1.3B and 14B from their published configs), sharded state (20 bytes a trainable "
        "weight: fp32 weights, gradients, AdamW moments, EMA; with LoRA the frozen base in fp32, as dforce "
        "keeps it under FSDP2, 4 bytes), "
        "two gathered blocks in bf16 (weights and gradients; LoRA: weights), activations from the bytes per "
        "token and layer that `memory` measures (ours: --ours-bytes x d; Wan: --wan-bytes A B, A x d + B x "
        "ffn_dim, and --wan-once x d per token once), checkpointed: each block's bf16 input (2d bytes per "
        "token and layer) plus one block recomputed.",
    )
    scale.add_argument("--gpus", type=int, default=8)
    scale.add_argument("--ours-frames", type=int, nargs="+", default=[16, 64], help="frames of ours")
    scale.add_argument(
        "--ours-bytes", type=float, default=64.0, help="ours: bytes per token and layer, per d (bf16)"
    )
    scale.add_argument("--wan-frames", type=int, default=21, help="latent frames (21: 81 pixel frames)")
    scale.add_argument(
        "--wan-size", type=int, nargs=2, default=[60, 104], help="latent height, width (480x832 / 8)"
    )
    scale.add_argument(
        "--wan-bytes", type=float, nargs=2, default=WAN_BYTES, metavar=("A", "B"),
        help="Wan: bytes per token and layer = A x d + B x ffn_dim (bf16)",
    )  # fmt: skip
    scale.add_argument(
        "--wan-once", type=float, default=12.0, help="Wan: bytes per token kept once, per d (modulation)"
    )
    scale.add_argument("--lora-ranks", type=int, nargs="*", default=[32], help="ranks of the LoRA rows")
    scale.add_argument(
        "--lora-base-bytes", type=float, default=4.0, help="bytes a frozen base weight (fp32 4, bf16 2)"
    )
    scale.set_defaults(run=bench_scale)
    memory.add_argument("--lora", type=int, default=None, help="train.lora.rank: adapters, base frozen")
    vae = commands.add_parser(
        "vae",
        help="encode clips/s (pipeline vs VAE alone), decode ms/frame (dforce vs direct), decode memory",
        description="For each --kind, a random VAE (kl: AutoencoderKL at a quarter of Stable Diffusion's "
        "widths; wan: AutoencoderKLWan at a sixth of Wan 2.1's; real depths, 8x in space) written by "
        "save_pretrained and loaded by dforce.data.vae.load_vae. Encode: clips per second of "
        "dforce.data.encode_latents.encode_latents (load_vae, tar reading, video decoding, resizing, "
        "encoding, latent shard writing) over --clips H.264 4:2:0 videos (crf 23) of --frames frames it "
        "writes first, beside dforce.data.vae.encode alone on the same clips already decoded to pixels; the "
        "ratio of their times. Decode: ms per pixel frame of dforce.data.vae.decode on the latents of the "
        f"first {DECODE_CLIPS} clips beside the VAE's own decode called on the same latents in one call, and "
        "the ratio. Memory: peak memory of dforce.data.vae.decode on random latent clips of each --lengths, "
        "minus the float32 output (GPU: CUDA's allocator peak; CPU: the profiler's running sum, as `memory` "
        f"measures), and the ratio longest / shortest (for kl also past one {CHUNK_FRAMES}-frame chunk). "
        "Best of "
        "--repeat timed runs after a warm-up.",
    )
    vae.add_argument("--kind", type=vae_kinds, default=["kl", "wan"], help="comma-separated: kl, wan")
    vae.add_argument("--size", type=int, default=64, help="frame side")
    vae.add_argument("--clips", type=int, default=8, help="clips encoded per run")
    vae.add_argument("--frames", type=int, default=17, help="frames per clip (Wan: 1 + 4k)")
    vae.add_argument(
        "--lengths", type=int, nargs="+", default=[5, 9, 17, 33], help="latent frames of the memory figures"
    )
    vae.add_argument("--repeat", type=int, default=2, help="timed runs; the fastest counts")
    vae.set_defaults(run=bench_vae)
    for command in train, memory, rollout:
        command.add_argument(
            "--backbone",
            choices=["dforce", "wan"],
            default="dforce",
            help="ours, or a random WanTransformer3DModel of the same shape (`model.backbone: wan`)",
        )
    for command in train, memory, rollout, vae:
        command.add_argument(
            "--threads", type=int, default=None, help="torch threads (default: torch's, one per core)"
        )
    for command in train, rollout, vae:
        command.add_argument(
            "--clock",
            choices=list(CLOCKS),
            default="wall",
            help="wall time, or this process's CPU time (with --threads 1, robust to other load)",
        )
    for command in commands.choices.values():
        command.add_argument("--json", action="store_true", help="one JSON object per figure")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    report(args.run(args), argv, args.json)


if __name__ == "__main__":
    main()
