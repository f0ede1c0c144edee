"""`dforce train CONFIG [key=value ...]`: the Accelerate training loop.

Reads top to bottom: build, resume, then per step `gradient_accumulation` micro-batches, clip, skip the
step if the gradient is not finite, optimiser, EMA, log, validate, checkpoint. Rerunning the same
command resumes from the newest readable checkpoint; every random draw of a step comes from
(seed, step, rank, micro-step), and the data position from the step, so the resumed run is the
uninterrupted one. Multi-process: `accelerate launch -m dforce train CONFIG` (see the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from dforce import DforceError
from dforce.config import Config, ConfigError, TrainConfig, model_kwargs
from dforce.data import DataConfig, make_loader, to_float
from dforce.loss import DenoisingLoss, LossOutput
from dforce.model import CausalVideoTransformer
from dforce.noise import NoiseSchedule
from dforce.sampler import rollout
from dforce.trajectory import get_weighting
from dforce.video import side_by_side, to_uint8, write_video

CHECKPOINTS = "checkpoints"
MODEL = "model"
LEVEL_BINS = 10


@dataclasses.dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with the Accelerator)."""

    step: int = 0  # optimiser steps taken, skipped ones included
    nonfinite_steps: int = 0  # steps skipped because the loss or gradient was not finite
    bad_in_a_row: int = 0
    skipped_samples: int = 0  # undecodable samples replaced in batches

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class TrainingStopped(DforceError, RuntimeError):
    """Too many non-finite steps in a row, or no checkpoint can be loaded; nothing is deleted."""


def step_seed(*keys: int) -> int:
    """A 63-bit seed from (seed, step, rank, micro-step, ...): independent streams, no global RNG."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def train(config: Config) -> Path:
    """Train (or resume) `config`; return the exported EMA model directory."""
    if config.objective == "self_forcing":
        from dforce.self_forcing import train_self_forcing

        return train_self_forcing(config)
    cfg, output = config.train, Path(config.output_dir)
    accelerator = make_accelerator(config)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    torch.manual_seed(config.seed)  # the same initial weights on every process
    model = trainable(CausalVideoTransformer(**model_kwargs(config)), cfg, device)
    optimizer, lr_scheduler = make_optimizer(model, cfg, cfg.lr, cfg.max_steps, world)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema, state = begin(accelerator, model, config)

    clips = held_out_clips(config, accelerator) if config.validation.shards else None
    loss_fn = make_loss(config, config.trajectory.name)
    meter = Meter(loss_fn.schedule.levels, device)
    batches = clip_batches(config, rank, world, consumed=state.step * cfg.gradient_accumulation)
    accelerator.init_trackers("dforce", config=flat_config(config))
    progress = tqdm(
        total=cfg.max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process
    )
    tick, tick_step = time.perf_counter(), state.step
    while state.step < cfg.max_steps:
        model.train()
        for micro in range(cfg.gradient_accumulation):
            batch = next(batches)
            x0 = to_float(batch["video"].to(device, non_blocking=True))  # [B, T, C, H, W]
            with accelerator.accumulate(model):
                out = loss_fn(
                    model,
                    x0,
                    seed=step_seed(config.seed, state.step, rank, micro),
                    labels=batch["label"].to(device) if "label" in batch else None,
                    actions=batch["actions"].to(device) if "actions" in batch else None,
                )
                accelerator.backward(out.loss)
            meter.add(out, int(batch["skipped"]))
        grad_norm = optimizer_step(accelerator, model, optimizer, lr_scheduler, cfg, state, output)
        if grad_norm.isfinite():
            ema.step(model.parameters())
        state.step += 1
        progress.update()

        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            logs = meter.flush(accelerator, state)
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            samples = (state.step - tick_step) * cfg.gradient_accumulation * cfg.batch_size * world
            tick_step = state.step
            logs.update(
                grad_norm=float(grad_norm),
                lr=lr_scheduler.get_last_lr()[0],
                samples_per_s=samples / elapsed,
            )
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
        last = state.step == cfg.max_steps
        if config.validation.shards and (state.step % config.validation.every == 0 or last):
            with ema_weights(ema, model):
                logs = validate(config, model, accelerator, state.step, clips)
            accelerator.log(logs, step=state.step)
            accelerator.print(f"step {state.step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in logs.items()))
            if last:
                steps = config.validation.sampling_steps
                accelerator.print(
                    f"held-out next-frame MSE: {logs['val/next_frame_mse_1step']:.4f} as the one-step "
                    f"posterior mean, {logs['val/next_frame_mse']:.4f} sampled in {steps} steps; "
                    f"copying the last frame: {logs['val/copy_last_frame_mse']:.4f}"
                )
        if state.step % cfg.checkpoint_every == 0 or last:  # export first: a kill between the two redoes both
            export_model(accelerator, model, ema, config, output / MODEL)
            save_checkpoint(accelerator, output / CHECKPOINTS, state.step, cfg.keep_checkpoints)
    progress.close()
    accelerator.end_training()
    return output / MODEL


def make_accelerator(config: Config) -> Accelerator:
    cfg, output = config.train, Path(config.output_dir)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )


def begin(accelerator: Accelerator, model: torch.nn.Module, config: Config) -> tuple[EMA, TrainState]:
    """The EMA of the prepared `model` (FSDP's shards, if sharded) and the counters, registered for
    checkpointing and loaded from the newest readable checkpoint; the config written beside them."""
    output = Path(config.output_dir)
    ema = EMA(model.parameters(), decay=config.train.ema_decay, foreach=True)
    state = TrainState()
    accelerator.register_for_checkpointing(ema, state)
    resumed = resume(accelerator, output / CHECKPOINTS)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    if resumed:
        accelerator.print(f"resumed from {resumed} at step {state.step}")
    return ema, state


def trainable(
    model: CausalVideoTransformer, cfg: TrainConfig, device: torch.device
) -> CausalVideoTransformer:
    """The model with the config's attention backend, activation checkpointing and regional compile."""
    model.attention_backend = cfg.attention_backend
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile if cfg.compile is not None else device.type == "cuda":
        model.compile_repeated_blocks(fullgraph=True)
    return model


def make_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, lr: float, steps: int, world: int
) -> tuple[torch.optim.Optimizer, object]:
    """AdamW and the config's learning-rate schedule over `steps` optimiser steps."""
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=True,  # one kernel per step on CPU and GPU alike (2.7x foreach on a 2-core CPU)
    )
    # The prepared scheduler steps once per process per optimiser step (Accelerate's convention).
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * world,
        num_training_steps=steps * world,
    )
    return optimizer, lr_scheduler


def optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: object,
    cfg: TrainConfig,
    state: TrainState,
    output: Path,
) -> torch.Tensor:
    """Clip, then step unless the gradient is not finite (counted; too many in a row stop the run
    naming the last good checkpoint); -> the gradient norm."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    if torch.isfinite(grad_norm):  # the step's one host sync: a NaN loss makes the norm NaN
        optimizer.step()
        state.bad_in_a_row = 0
    else:
        state.nonfinite_steps += 1
        state.bad_in_a_row += 1
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if state.bad_in_a_row >= cfg.max_bad_steps:
        latest = list_checkpoints(output / CHECKPOINTS)
        raise TrainingStopped(
            f"stopped at step {state.step + 1}: {state.bad_in_a_row} non-finite losses in a row "
            f"(lower train.lr or check the data); the last good checkpoint is "
            f"{latest[-1] if latest else 'none (no checkpoint was written yet)'}"
        )
    return grad_norm


def make_loss(config: Config, weighting: str, augment: bool = True) -> DenoisingLoss:
    """The training loss; or, for validation, the plain loss under any weighting (`augment=False`: no
    dropped history or labels, no context noise)."""
    options = {"cube_levels": config.trajectory.cube_levels}
    training = weighting == config.trajectory.name
    if training:
        options.update(config.trajectory.options)
    return DenoisingLoss(
        config.noise.build(),
        config.noise.parameterization,
        get_weighting(weighting, config.data.clip_frames, config.noise.levels, **options),
        level_weight=config.loss.level_weight,
        level_weight_options=config.loss.level_weight_options,
        teacher_layout=config.loss.teacher_layout and model_kwargs(config).get("frames_per_block", 1) == 1,
        drop_history=config.loss.drop_history if augment else 0.0,
        drop_labels=config.loss.drop_labels if augment else 0.0,
        context_noise=config.loss.context_noise if augment and training else 0,
    )


def clip_batches(config: Config, rank: int, world: int, consumed: int) -> Iterator[dict]:
    """This rank's batches without end, starting after the first `consumed` (epoch after epoch)."""
    size = config.train.batch_size
    per_epoch = len(make_loader(config.data, batch_size=size, rank=rank, world_size=world))
    epoch, start = divmod(consumed, per_epoch)
    while True:
        yield from make_loader(
            config.data,
            batch_size=size,
            rank=rank,
            world_size=world,
            epoch=epoch,
            start=start,
            pin_memory=torch.cuda.is_available(),
        )
        epoch, start = epoch + 1, 0


class Meter:
    """Sums on the device between log steps, so the loop never waits for the loss."""

    def __init__(self, levels: int, device: torch.device) -> None:
        self.levels, self.device = levels, device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.count = 0
        self.bin_sum = torch.zeros(LEVEL_BINS, device=self.device)
        self.bin_count = torch.zeros(LEVEL_BINS, device=self.device)
        self.skipped = 0

    def add(self, out: LossOutput, skipped: int) -> None:
        self.loss += out.loss.detach().float()
        self.count += 1
        bins = ((out.levels - 1).clamp(min=0) * LEVEL_BINS // self.levels).flatten()  # [B * T]
        trained = out.trained.flatten()  # a mask, not an index: selecting would wait for the device
        self.bin_sum.index_add_(0, bins, torch.where(trained, out.error.flatten(), 0))
        self.bin_count.index_add_(0, bins, trained.float())
        self.skipped += skipped

    def flush(self, accelerator: Accelerator, state: TrainState) -> dict[str, float]:
        sums = torch.cat([self.loss[None] / max(self.count, 1), self.bin_sum, self.bin_count])
        sums = torch.cat([sums, torch.tensor([float(self.skipped)], device=self.device)])
        sums = accelerator.reduce(sums, reduction="sum").tolist()
        world = accelerator.num_processes
        state.skipped_samples += int(sums[-1])
        logs = {"loss": sums[0] / world, "skipped_samples": state.skipped_samples}
        logs["nonfinite_steps"] = state.nonfinite_steps
        for b in range(LEVEL_BINS):
            total, count = sums[1 + b], sums[1 + LEVEL_BINS + b]
            if count:
                logs[f"loss_by_level/{b / LEVEL_BINS:.1f}-{(b + 1) / LEVEL_BINS:.1f}"] = total / count
        self.reset()
        return logs


def _local(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Detached aliases of the tensors, FSDP2 shards (DTensors) as this rank's plain local tensors."""
    return [t.detach().to_local() if isinstance(t, DTensor) else t.detach() for t in tensors]


class EMA(EMAModel):
    """diffusers' EMAModel, whose checkpoints hold whole tensors and load back where the EMA lives.

    Under FSDP2 the shadow parameters are shards (DTensors) like the parameters: swapping them in and out
    copies local shards, saving gathers them on every rank (Accelerate calls `state_dict` on all, the main
    process writes) and loading cuts them again. Accelerate loads checkpoints to the CPU; loading moves
    them back to the EMA's devices.
    """

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["shadow_params"] = [
            p.full_tensor() if isinstance(p, DTensor) else p for p in state["shadow_params"]
        ]
        return state

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        super().store(_local(parameters))

    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        torch._foreach_copy_(_local(parameters), _local(self.shadow_params))

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        super().restore(_local(parameters))

    def load_state_dict(self, state_dict: dict) -> None:
        like = self.shadow_params
        super().load_state_dict(state_dict)
        self.shadow_params = [
            distribute_tensor(p, old.device_mesh, old.placements)
            if isinstance(old, DTensor)
            else p.to(old.device)
            for p, old in zip(self.shadow_params, like, strict=True)
        ]


@contextlib.contextmanager
def ema_weights(ema: EMAModel, model: torch.nn.Module) -> Iterator[None]:
    """The EMA weights in the model for the duration of a block (validation, export)."""
    params = sharded_parameters(model)
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(sharded_parameters(model))


def sharded_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters as the optimiser and EMA hold them: FSDP2 keeps the root module's weights gathered
    after a forward without backward (validation), so they are sharded again first."""
    if isinstance(model, FSDPModule):
        model.reshard()
    return list(model.parameters())


def held_out_data(config: Config) -> DataConfig:
    """The validation shards, read in order from the first frame of each clip."""
    shards = config.validation.shards
    return dataclasses.replace(config.data, shards=shards, shuffle=False, resampled=False, clip_start=0)


@torch.no_grad()
def validate(
    config: Config, model: torch.nn.Module, accelerator: Accelerator, step: int, clips: dict | None
) -> dict[str, float]:
    """Held-out loss per weighting and next-frame error (sampled, and the one-step posterior mean) next to
    copying the last frame, on the same clips and seeds every time; the main process also writes
    rollouts beside the real clips."""
    val, device = config.validation, accelerator.device
    data = held_out_data(config)
    net = accelerator.unwrap_model(model).eval()
    schedule = config.noise.build().to(device)
    sums: dict[str, torch.Tensor] = {}
    counts = {"loss": 0, "rollout": 0}  # batches read, should the held-out data hold fewer than asked
    losses = {name: make_loss(config, name, augment=False) for name in val.weightings}
    loaders = {"loss": data, "rollout": dataclasses.replace(data, clip_frames=val.context_frames + 1)}
    for purpose, data_config in loaders.items():
        loader = make_loader(
            data_config,
            batch_size=config.train.batch_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        for i, batch in zip(range(val.batches), loader, strict=False):
            x0 = to_float(batch["video"].to(device))  # [B, T, C, H, W]
            labels = batch["label"].to(device) if "label" in batch else None
            actions = batch["actions"].to(device) if "actions" in batch else None
            seed = step_seed(config.seed, i)
            counts[purpose] += 1
            if purpose == "loss":
                for name, loss_fn in losses.items():
                    loss = loss_fn(net, x0, seed, labels=labels, actions=actions).loss
                    sums[f"val/loss_{name}"] = sums.get(f"val/loss_{name}", 0) + loss
                continue
            context, truth = x0[:, : val.context_frames], x0[:, val.context_frames]
            guesses = {"copy_last_frame_mse": context[:, -1]}
            # One step from pure noise is the model's posterior mean, the least-squares prediction.
            for name, steps in (("next_frame_mse", val.sampling_steps), ("next_frame_mse_1step", 1)):
                guesses[name] = rollout(
                    net,
                    schedule,
                    config.noise.parameterization,
                    context,
                    1,
                    steps=steps,
                    context_noise=val.context_noise,
                    labels=labels,
                    actions=actions,
                    generator=torch.Generator(device).manual_seed(seed),
                )[:, -1]
            for name, guess in guesses.items():
                sums[f"val/{name}"] = sums.get(f"val/{name}", 0) + (guess - truth).square().mean()
    logs = {
        key: accelerator.reduce(value / counts["loss" if "loss_" in key else "rollout"], "mean").item()
        for key, value in sums.items()
    }
    if clips is not None:
        write_rollouts(config, net, schedule, clips, step, accelerator)
    net.train()
    return logs


def held_out_clips(config: Config, accelerator: Accelerator) -> dict | None:
    """The clips the main process rolls out from at each validation (under FSDP every rank, as each takes
    part in every forward), read before training starts so that a `validation` section the held-out data
    cannot serve fails at once, not at the first validation."""
    val = config.validation
    data = held_out_data(config)
    frames = val.context_frames + val.rollout_frames
    try:
        make_loader(  # enough held-out clips for the losses on every rank
            data,
            batch_size=config.train.batch_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        if not (val.rollout_clips and (accelerator.is_main_process or accelerator.is_fsdp2)):
            return None
        rollout_data = dataclasses.replace(data, clip_frames=frames)
        return next(iter(make_loader(rollout_data, batch_size=val.rollout_clips)))
    except ValueError as error:
        raise ConfigError(
            f"validation: the held-out shards cannot give {config.train.batch_size} clips per rank, and "
            f"{val.rollout_clips} clips of context_frames + rollout_frames = {frames} frames: {error}"
        ) from None


def write_rollouts(
    config: Config,
    model: CausalVideoTransformer,
    schedule: NoiseSchedule,
    batch: dict,
    step: int,
    accelerator: Accelerator,
) -> Path:
    """Roll out from held-out clips past the horizon; real frames on the right (written by the main
    process)."""
    val = config.validation
    real = to_float(batch["video"].to(accelerator.device))  # [N, T, C, H, W]
    fake = rollout(
        model,
        schedule,
        config.noise.parameterization,
        real[:, : val.context_frames],
        val.rollout_frames,
        scheduling=val.scheduling,
        steps=val.sampling_steps,
        context_noise=val.context_noise,
        labels=batch["label"].to(accelerator.device) if "label" in batch else None,
        actions=batch["actions"].to(accelerator.device) if "actions" in batch else None,
        generator=torch.Generator(accelerator.device).manual_seed(config.seed),
    )
    grid = torch.cat([side_by_side(f, r) for f, r in zip(fake, real, strict=True)], dim=-2)  # [T, C, N*H, 2W]
    out = Path(config.output_dir) / "samples" / f"step_{step:08d}.mp4"
    if accelerator.is_main_process:
        write_video(out, to_uint8(grid), fps=8, scale=4)
        tracker = next((t for t in accelerator.trackers if t.name == "tensorboard"), None)
        if tracker is not None:
            tracker.writer.add_images("rollout", to_uint8(grid).permute(0, 3, 1, 2), step)  # [T, 3, H, W]
    return out


def list_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished ones are hidden `.tmp-*` directories)."""
    found = [p for p in directory.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resume(accelerator: Accelerator, directory: Path) -> Path | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning."""
    checkpoints = list_checkpoints(directory)
    for checkpoint in reversed(checkpoints):
        try:
            accelerator.load_state(str(checkpoint))
            return checkpoint
        except Exception as error:  # any unreadable file: safetensors, pickle, shapes, missing files
            message = f"warning: checkpoint {checkpoint} is damaged ({error}); using the one before"
            accelerator.print(message, file=sys.stderr)
    if checkpoints:
        raise TrainingStopped(
            f"none of the {len(checkpoints)} checkpoints in {directory} can be loaded; "
            "was the config changed? Move them away to start afresh"
        )
    return None


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a hidden directory, renamed when complete; keep the newest `keep`."""
    final, partial = directory / f"step_{step:08d}", directory / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def export_model(
    accelerator: Accelerator, model: torch.nn.Module, ema: EMAModel, config: Config, directory: Path
) -> None:
    """The EMA weights as a diffusers model directory plus `noise.json`, replaced atomically. Under FSDP
    every rank joins in gathering the whole weights, which the main process writes from a plain copy."""
    with ema_weights(ema, model):
        net = accelerator.unwrap_model(model)
        if accelerator.is_fsdp2:
            state = accelerator.get_state_dict(model)
            if accelerator.is_main_process:
                net = CausalVideoTransformer.from_config(net.config)
                net.load_state_dict(state)
        if accelerator.is_main_process:
            partial = directory.with_name(f".tmp-{directory.name}")
            shutil.rmtree(partial, ignore_errors=True)
            net.save_pretrained(partial)
            config.noise.save(partial)
            old = directory.with_name(f".old-{directory.name}")
            if directory.exists():
                directory.rename(old)
            partial.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def flat_config(config: Config) -> dict[str, int | float | str | bool]:
    """Dotted keys with scalar values, as trackers (TensorBoard hparams) want them."""
    flat = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix[:-1]] = node
        elif node is not None:
            flat[prefix[:-1]] = str(node)

    walk(dataclasses.asdict(config), "")
    return flat
