"""Diffusion forcing: the denoising loss of a trajectory weighting, on a model trained from scratch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from dforce.data.text import Text
from dforce.models.backbone import build_model
from dforce.training.config import Config, model_kwargs
from dforce.training.engine import Meter, make_loss, make_optimizer, optimizer_step, step_seed, trainable

if TYPE_CHECKING:
    from dforce.training.trainer import Trainer


class Denoising:
    """`objective: denoising`: each step, `gradient_accumulation` micro-batches of the loss of
    `config.trajectory`, every draw seeded by (seed, step, rank, micro-step)."""

    name = "train"

    def __init__(self, config: Config, trainer: Trainer) -> None:
        self.config, self.trainer, cfg = config, trainer, config.train
        torch.manual_seed(config.seed)  # the same initial weights on every process
        model = trainable(build_model(model_kwargs(config)), cfg, trainer.accelerator)
        optimizer, lr_scheduler = make_optimizer(model, cfg, cfg.lr, cfg.max_steps, trainer.world)
        self.model, self.optimizer, self.lr_scheduler = trainer.accelerator.prepare(
            model, optimizer, lr_scheduler
        )
        self.steps = cfg.max_steps
        self.loss_fn = make_loss(config, config.trajectory.name, model.frames_per_block)
        self.meter = Meter(self.loss_fn.schedule.levels, trainer.device)
        self.grad_norm = torch.zeros(())

    def batches_read(self, step: int) -> int:
        return step * self.config.train.gradient_accumulation

    def step(self, step: int, batches: Iterator[dict]) -> torch.Tensor:
        trainer, cfg = self.trainer, self.config.train
        self.model.train()
        for micro in range(cfg.gradient_accumulation):
            batch = next(batches)
            with trainer.accelerator.accumulate(self.model):
                out = self.loss_fn(
                    self.model,
                    batch["video"],  # [B, T, C, H, W]
                    seed=step_seed(self.config.seed, step, trainer.rank, micro),
                    labels=batch.get("label"),
                    actions=batch.get("actions"),
                    text=Text.of(batch),
                )
                trainer.accelerator.backward(out.loss)
            self.meter.add(out, batch["skipped"])
        self.grad_norm = optimizer_step(
            trainer.accelerator,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            cfg,
            trainer.state,
            trainer.output,
        )
        return self.grad_norm

    def logs(self, steps: int, seconds: float) -> dict[str, float]:
        cfg = self.config.train
        logs = self.meter.flush(self.trainer.accelerator, self.trainer.state)
        samples = steps * cfg.gradient_accumulation * cfg.batch_size * self.trainer.world
        logs.update(
            grad_norm=float(self.grad_norm),
            lr=self.lr_scheduler.get_last_lr()[0],
            samples_per_s=samples / seconds,
        )
        return logs
