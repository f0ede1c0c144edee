"""The parts of a training step that every objective shares: the model made trainable (in full, or its
LoRA adapters), AdamW and its schedule, the guarded optimiser step, the per-step seeds, and the meter that
sums losses on the device.

Nothing here knows an objective; `dforce.training.trainer` runs the loop, `dforce.training.objectives` the
steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch.distributed.tensor import DTensor

from dforce.diffusion.loss import DenoisingLoss, LossOutput
from dforce.diffusion.trajectory import get_weighting
from dforce.models.backbone import Backbone
from dforce.models.lora import add_lora
from dforce.training.checkpoint import CHECKPOINTS, TrainingStopped, list_checkpoints
from dforce.training.config import Config, TrainConfig
from dforce.training.ema import trained_parameters

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


def step_seed(*keys: int) -> int:
    """A 63-bit seed from (seed, step, rank, micro-step, ...): independent streams, no global RNG."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


def trainable(model: Backbone, cfg: TrainConfig, accelerator: Accelerator) -> Backbone:
    """The model with the config's LoRA adapters (its base frozen and held as `hold_frozen` says),
    attention backend, activation checkpointing and regional compile."""
    device = accelerator.device
    if cfg.lora is not None:
        add_lora(model, cfg.lora)
        hold_frozen(model, frozen_dtype(cfg, accelerator))
    model.attention_backend = cfg.attention_backend
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if cfg.compile if cfg.compile is not None else device.type == "cuda":
        model.compile_repeated_blocks(fullgraph=True)
    return model


def frozen_dtype(cfg: TrainConfig, accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights (a LoRA base, self-forcing's teacher) are held in: bf16 when training in
    bf16, as diffusers' training scripts hold them (half the memory; autocast computes in bf16 anyway), unless
    `train.frozen_fp32`; fp32 otherwise, and under FSDP2, whose shards take one dtype per module."""
    bf16 = accelerator.mixed_precision == "bf16" and not cfg.frozen_fp32 and not accelerator.is_fsdp2
    return torch.bfloat16 if bf16 else torch.float32


def hold_frozen(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model`'s frozen floating-point weights in `dtype`, in place (trees sharing them see it too); the
    trained ones stay as they are."""
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
    return model


def make_optimizer(
    model: torch.nn.Module,
    cfg: TrainConfig,
    lr: float,
    steps: int,
    world: int,
    updates_per_step: int = 1,
) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over the trained weights (under LoRA the adapters) and the config's learning-rate schedule
    over `steps` training steps (and `warmup_steps`) of `updates_per_step` optimiser updates each (a
    self-forcing critic updates `critic_steps` times a step)."""
    optimizer = torch.optim.AdamW(
        trained_parameters(model),
        lr=lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=True,  # one kernel per step on CPU and GPU alike (2.7x foreach on a 2-core CPU)
    )
    # The prepared scheduler steps once per process per optimiser step (Accelerate's convention).
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.warmup_steps * updates_per_step * world,
        num_training_steps=steps * updates_per_step * world,
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
    if accelerator.is_fsdp2:
        # Accelerate finds the model to clip by comparing parameter lists with `==`, which raises for two
        # prepared models of the same size (self-forcing's generator and critic); torch clips DTensor
        # gradients itself, one mesh per model.
        grads = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(grads, cfg.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
    else:
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


def make_loss(config: Config, weighting: str, block: int, augment: bool = True) -> DenoisingLoss:
    """The training loss of `config` for a model of `block` frames per block (its `frames_per_block`: the
    weighting's unit); or, for validation, the plain loss under any weighting (`augment=False`: no dropped
    history, labels or text, no context noise)."""
    options = {"cube_levels": config.trajectory.cube_levels}
    training = weighting == config.trajectory.name
    if training:
        options.update(config.trajectory.options)
    return DenoisingLoss(
        config.noise.build(),
        config.noise.parameterization,
        get_weighting(weighting, config.data.clip_frames, config.noise.levels, block, **options),
        level_weight=config.loss.level_weight,
        level_weight_options=config.loss.level_weight_options,
        teacher_layout=config.loss.teacher_layout,
        drop_history=config.loss.drop_history if augment else 0.0,
        drop_labels=config.loss.drop_labels if augment else 0.0,
        context_noise=config.loss.context_noise if augment and training else 0,
        drop_text=config.loss.drop_text if augment else 0.0,
    )
