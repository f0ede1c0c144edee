"""The check for a lent GPU: every CUDA path against the CPU-tested one, and the figures only a GPU gives, in
one run of about 4 minutes on one H100/H200, written as report.json and report.md.

    make gpu-bundle     # here: .gpu/ with the wheels the bare machine lacks and the yardstick
    # there (the `device` tool's run, carry [".gpu"]):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl && \\
        PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py --yardstick .gpu/yardstick.py --out $OUT
    python tools/gpu_check.py --tiny --out /tmp/check    # the CPU dry run at tiny shapes (its test)

Checks, each ok / failed / skipped with its numbers:
  flex    flex attention (compiled on CUDA) against SDPA with a mask, our model and Wan: outputs and
          gradients (CPU: outputs only, flex has no backward there)
  bf16    training steps under bf16 autocast with fused AdamW (CUDA): finite losses, weights moved
  fsdp2   one process, FSDP2 over every block and the root: the same loss and gradients as unsharded
Figures:
  step     `tools/bench.py train`: the training step's useful TFLOP/s against the yardstick, same run
  memory   peak memory of a checkpointed bf16 diffusion-forcing step of Wan 2.1 1.3B at 21 x 1560 tokens,
           every weight trained, beside `bench.py scale`'s model of it on one GPU
  rollout  latent frames per second of a cached 4-step rollout of that model, blocks of 3 latents
           (Self-Forcing reports 17 pixel frames, about 4.25 latents, per second on one H100)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dforce.diffusion.noise import NoiseSchedule  # noqa: E402
from dforce.diffusion.rollout import rollout  # noqa: E402
from dforce.models.backbone import build_model  # noqa: E402

spec = importlib.util.spec_from_file_location("bench", ROOT / "tools/bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

WAN_13B = {
    "backbone": "wan",
    "sample_size": (60, 104),
    "num_frames": 21,
    "frames_per_block": 3,
    "text": False,
}
WAN_13B["config"] = {**bench.WAN_COMMON, **bench.SCALE_WAN["Wan2.1 1.3B"]}
WAN_TINY = {"backbone": "wan", "sample_size": (8, 8), "num_frames": 6, "frames_per_block": 3, "text": False}
WAN_TINY["config"] = {**bench.WAN_COMMON, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}
WAN_TINY["config"] |= {"ffn_dim": 64, "text_dim": 32, "freq_dim": 32}
OURS = dict(sample_size=16, patch_size=2, num_frames=8, frames_per_block=2, num_layers=2,
            num_attention_heads=4, attention_head_dim=32, in_channels=4)  # fmt: skip


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over whole tensors (norms)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Small random values added to every weight, seeded: a freshly built model is the zero function
    (adaLN-zero, a zero output layer), which would compare equal under any attention."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator).to(parameter))
    return model


def built(section: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomized(build_model(section)).to(device)
    model.attention_backend = "sdpa"
    return model


def inputs(model: torch.nn.Module, device: torch.device, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, model.horizon, *model.frame_shape, generator=generator).to(device)
    return sample, torch.randint(0, 1000, sample.shape[:2], generator=generator).to(device)


def check_flex(device: torch.device, tiny: bool) -> dict:
    """Flex (compiled on CUDA) against SDPA: each backbone's output and, on CUDA, its gradients."""
    found = {}
    for name, section in (("ours", {"backbone": "dforce", **OURS}), ("wan", WAN_TINY)):
        reference = built(section, device)
        flex = copy.deepcopy(reference)
        flex.attention_backend = "flex"
        if device.type == "cuda":
            flex.compile_repeated_blocks(fullgraph=True)
        sample, timesteps = inputs(reference, device)
        grad = device.type == "cuda"  # flex has no backward on the CPU
        with torch.set_grad_enabled(grad):
            outs = [net(sample, timesteps) for net in (reference, flex)]
        found[f"{name} output"] = relative(outs[1], outs[0])
        if grad:
            for out in outs:
                out.square().mean().backward()
            grads = [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (reference, flex)]
            found[f"{name} gradients"] = relative(grads[1], grads[0])
    ok = all(value < 1e-3 for value in found.values())
    return {"check": "flex", "status": "ok" if ok else "failed", "values": found, "bound": 1e-3}


def check_bf16(device: torch.device, tiny: bool) -> dict:
    """Three steps regressing onto a fixed target under bf16 autocast with AdamW (fused on CUDA): the
    losses finite and falling, every weight moved."""
    model = built({"backbone": "dforce", **OURS}, device)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    sample, timesteps = inputs(model, device)
    target = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3)).to(device)
    losses = []
    for _ in range(3):
        with torch.autocast(device.type, torch.bfloat16):
            loss = (model(sample, timesteps).float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    moved = sum(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
    finite = all(torch.isfinite(torch.tensor(losses)))
    ok = finite and losses[-1] < losses[0] and moved == len(start)
    values = {"losses": losses, "weights moved": f"{moved}/{len(start)}", "fused": device.type == "cuda"}
    return {"check": "bf16", "status": "ok" if ok else "failed", "values": values}


def check_fsdp2(device: torch.device, tiny: bool) -> dict:
    """One process as a world of one: FSDP2 over every block and the root, against the model unsharded."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        reference = built({"backbone": "dforce", **OURS}, device)
        sharded = copy.deepcopy(reference)
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        sample, timesteps = inputs(reference, device)
        losses, grads = [], []
        for net in reference, sharded:
            loss = net(sample, timesteps).square().mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append(torch.cat([getattr(p.grad, "full_tensor", lambda g=p.grad: g)().flatten()
                                    for p in net.parameters()]))  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()
    values = {"loss": relative(losses[1], losses[0]), "gradients": relative(grads[1], grads[0])}
    ok = all(value < 1e-5 for value in values.values())
    return {"check": "fsdp2", "status": "ok" if ok else "failed", "values": values, "bound": 1e-5}


def figure_step(device: torch.device, tiny: bool, yardstick: Path | None) -> dict:
    """`tools/bench.py train` at its shape for the device (tiny: a 2-layer model, one step)."""
    if yardstick is not None:
        bench.YARDSTICK = yardstick
    argv = ["train", "--steps", "1", "--repeat", "1"] if tiny else ["train"]
    if tiny:
        argv += ["--model", "num_layers=2", "num_attention_heads=2", "attention_head_dim=32"]
    figures = bench.bench_train(bench.build_parser().parse_args(argv))
    values = {f["figure"]: f["value"] for f in figures}
    return {"figure": "step", "status": "ok", "values": values}


def figure_memory(device: torch.device, tiny: bool) -> dict:
    """Peak memory of a checkpointed bf16 diffusion-forcing step of Wan 1.3B (every weight trained), the
    state live before it included, beside `bench.py scale`'s model of the same on one GPU."""
    section = WAN_TINY if tiny else WAN_13B
    args = argparse.Namespace(
        model=[], batch=1, mixed_precision="bf16", compile=None, lora=None, backbone="wan"
    )
    config = bench.bench_config(args, device, checkpointing=True)
    frames = section["num_frames"]
    model_section = {key: value for key, value in section.items() if key not in ("num_frames", "backbone")}
    config.model = {"backbone": "wan", **model_section}
    config.data.clip_frames = frames
    step, model = bench.training_step(config, device)
    step(0)
    bench._sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(1)
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = bench.cpu_peak_bytes(lambda: step(1))
    d = bench.model_shape(model)["d"]
    ffn = model.transformer.config.ffn_dim
    per_layer = bench.WAN_BYTES[0] * d + bench.WAN_BYTES[1] * ffn
    scale = argparse.Namespace(gpus=1, lora_base_bytes=4.0)
    tpf = model.grid[0] * model.grid[1]
    row = bench.scale_row("Wan", model, scale, frames, tpf, per_layer, None, 12.0 * d)
    values = {"tokens": frames * tpf, "peak GiB": peak / 2**30, "model ckpt GiB": row["ckpt GiB"]}
    values["note"] = "CPU: the step's peak above what was live; CUDA: the allocator's whole peak"
    return {"figure": "memory", "status": "ok", "values": values}


def figure_rollout(device: torch.device, tiny: bool) -> dict:
    """Latent frames per second of a cached rollout of the horizon, 4 steps a block of 3, batch 1."""
    torch.manual_seed(0)
    section = WAN_TINY if tiny else WAN_13B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(section).to(device, dtype).eval()
    schedule = NoiseSchedule.from_name("flow", 1000).to(device)
    context = torch.zeros(1, 0, *model.frame_shape, device=device, dtype=dtype)

    def run() -> None:
        rollout(model, schedule, "flow", context, model.horizon, steps=4, sampler="euler")

    run()  # warm-up, compilation
    bench._sync(device)
    start = time.perf_counter()
    run()
    bench._sync(device)
    seconds = time.perf_counter() - start
    values = {"latent frames": model.horizon, "seconds": seconds, "latent frames/s": model.horizon / seconds}
    return {"figure": "rollout", "status": "ok", "values": values}


def guarded(name: str, run: Callable[[], dict]) -> dict:
    """One check or figure, with Accelerate's process-wide state fresh (each figure builds its own
    trainer); an exception is its result, not the end of the report."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    start = time.perf_counter()
    try:
        result = run()
    except Exception as error:  # every check is reported, whatever one of them raises
        result = {"check": name, "status": "failed", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(limit=4)}  # fmt: skip
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result, default=str), flush=True)
    return result


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "", f"{report['machine']}; torch {report['torch']}", ""]
    lines += ["| check or figure | status | values | seconds |", "|---|---|---|---|"]
    for item in report["results"]:
        name = item.get("check") or item.get("figure")
        values = item.get("values") or item.get("error", "")
        if isinstance(values, dict):
            values = "; ".join(
                f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items()
            )
        lines.append(f"| {name} | {item['status']} | {values} | {item['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder of report.json and report.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: the CPU dry run")
    parser.add_argument("--yardstick", type=Path, default=None, help="yardstick.py (default: bench.py's)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA device here: the full check is for a GPU; --tiny runs the dry run")
    runs = {
        "flex": lambda: check_flex(device, args.tiny),
        "bf16": lambda: check_bf16(device, args.tiny),
        "fsdp2": lambda: check_fsdp2(device, args.tiny),
        "step": lambda: figure_step(device, args.tiny, args.yardstick),
        "memory": lambda: figure_memory(device, args.tiny),
        "rollout": lambda: figure_rollout(device, args.tiny),
    }
    results = [guarded(name, run) for name, run in runs.items()]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": bench.machine(),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(report))
    return 0 if all(item["status"] == "ok" for item in results) else 1


if __name__ == "__main__":
    sys.exit(main())
