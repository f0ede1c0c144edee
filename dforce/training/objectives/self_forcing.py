"""Self-forcing: a few-step generator trained on its own rollouts with the reverse KL (seed 000, section 5).

One step: `gradient_accumulation` generator micro-steps (rollout, then the distribution-matching loss of
`dforce.training.objectives.dmd`), then `critic_steps` critic updates (the first on the generator's own clips,
the others on fresh rollouts). With `init: ode` the first `ode_steps` steps regress the generator onto the
teacher's many-step samples instead (`dforce.training.objectives.ode_init`). The generator and the critic
start as copies of the teacher, or under `train.lora` as the teacher with an adapter each: three module trees
over one copy of the teacher's frozen weights (`dforce.models.lora.share_base`), each prepared as a model of
its own (switching adapters on one module would fight DDP's fixed parameter set and activation checkpointing's
recompute). Checkpoints hold all three models, both optimisers and the counters, and the loop exports the
generator's EMA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from dforce.data.text import Text
from dforce.models.backbone import Backbone
from dforce.training.config import Config, ConfigError, TrainConfig
from dforce.training.engine import (
    Meter,
    frozen_dtype,
    hold_frozen,
    make_optimizer,
    optimizer_step,
    step_seed,
    trainable,
)
from dforce.training.objectives.dmd import CRITIC, DMD, PLAN, ROLLOUT, SelfForcing, plan_rollout
from dforce.training.objectives.ode_init import ode_regression
from dforce.training.objectives.roles import build_roles

if TYPE_CHECKING:
    from dforce.training.trainer import Trainer


class SelfForcingObjective:
    """`objective: self_forcing`, from the model directory `self_forcing.teacher`."""

    name = "self-forcing"

    def __init__(self, config: Config, trainer: Trainer) -> None:
        sf, cfg = config.self_forcing, config.train
        if config.model:
            raise ConfigError(
                "model: self-forcing takes the teacher's architecture; remove the model section"
            )
        roles = build_roles(sf, cfg.lora is not None, config.data.clip_frames, trainer.space)
        self.config = config = dataclasses.replace(config, noise=roles.noise)  # exported with the generator
        self.trainer, accelerator, device = trainer, trainer.accelerator, trainer.device
        self.schedule = roles.noise.build().to(device)
        negative = None if sf.negative_prompt is None else load_negative(sf.negative_prompt, roles.teacher)
        self.core = SelfForcing(config, self.schedule, roles.teacher, roles.generator, negative)
        teacher = hold_frozen(roles.teacher, frozen_dtype(cfg, accelerator))
        teacher.attention_backend = cfg.attention_backend
        torch.manual_seed(config.seed)  # the adapters' first weights, alike on every process
        starts = roles.generator, roles.critic
        generator, critic = (trainable(net.train(), cfg, accelerator) for net in starts)
        self.ode_steps = sf.ode_steps if sf.init == "ode" else 0  # the ODE regression comes first
        self.steps = cfg.max_steps + self.ode_steps
        # The critic's schedule runs in its own updates: critic_steps per generator step after the ODE steps.
        g_opt, g_sched = make_optimizer(generator, cfg, cfg.lr, self.steps, trainer.world)
        self.critic_cfg = critic_cfg = critic_train_config(config)
        critic_lr, updates = sf.critic_lr or cfg.lr, sf.critic_steps
        c_opt, c_sched = make_optimizer(critic, critic_cfg, critic_lr, cfg.max_steps, trainer.world, updates)
        # One model a `prepare`, as FSDP2 takes them (the same lists of models, optimisers and schedulers
        # as one call would make, so checkpoints keep their layout); the frozen teacher is sharded under
        # FSDP2, and only placed otherwise (no DDP: it has nothing to synchronise).
        self.model, self.g_opt, self.g_sched = accelerator.prepare(generator, g_opt, g_sched)
        self.critic, self.c_opt, self.c_sched = accelerator.prepare(critic, c_opt, c_sched)
        if accelerator.is_fsdp2:
            self.teacher = accelerator.prepare(teacher)
            # FSDP2 keeps a root unsharded after its forward, for the backward that follows; the teacher
            # has none, so its root reshards at once (its blocks do so themselves).
            self.teacher.register_forward_hook(lambda module, args, out: module.reshard())
        else:
            self.teacher = accelerator.prepare_model(teacher, evaluation_mode=True)

        self.meter = Meter(self.schedule.levels, device)  # the critic's denoising loss
        self.dmd_sum, self.grad_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        self.count = 0
        self.ode, self.grad_norm, self.critic_norm = False, torch.zeros(()), torch.zeros(())

    def batches_read(self, step: int) -> int:
        """An ODE step reads a batch a micro-step, a later one `critic_steps` of them."""
        ode_done = min(step, self.ode_steps)
        return self.config.train.gradient_accumulation * (
            ode_done + (step - ode_done) * self.config.self_forcing.critic_steps
        )

    def step(self, step: int, batches: Iterator[dict]) -> torch.Tensor:
        trainer, cfg, sf, core = self.trainer, self.config.train, self.config.self_forcing, self.core
        accelerator, seed0 = trainer.accelerator, self.config.seed
        self.ode = ode = step < self.ode_steps
        fakes = []
        for micro in range(cfg.gradient_accumulation):
            batch = next(batches)
            shared = step_seed(seed0, step, micro, PLAN)  # the same on every process
            seed = step_seed(seed0, step, trainer.rank, micro)
            with accelerator.accumulate(self.model):
                if ode:
                    loss = ode_regression(core, self.teacher, self.model, batch, seed)
                else:
                    plan = plan_rollout(shared, sf, core.horizon, core.block, core.total)
                    clip = core.rollout(self.model, batch, step_seed(seed, ROLLOUT), plan)
                    real = max(0, sf.context_frames - plan.window_start)
                    loss, grad = core.distribution_matching(
                        self.teacher, self.critic, clip, step_seed(seed, DMD), real, batch
                    )
                    fakes.append((clip.detach(), batch))
                    self.grad_sum += grad
                accelerator.backward(loss)
                self.dmd_sum += loss.detach().float()
                self.count += 1
        self.grad_norm = optimizer_step(
            accelerator, self.model, self.g_opt, self.g_sched, cfg, trainer.state, trainer.output
        )
        for update in range(0 if ode else sf.critic_steps):
            for micro in range(cfg.gradient_accumulation):
                seed = step_seed(seed0, step, trainer.rank, micro, update + 2)
                if update == 0:
                    clip, batch = fakes[micro]
                else:
                    batch = next(batches)
                    shared = step_seed(seed0, step, micro, update + 2, PLAN)
                    plan = plan_rollout(shared, sf, core.horizon, core.block, core.total)
                    with torch.no_grad():
                        clip = core.rollout(self.model, batch, step_seed(seed, ROLLOUT), plan)
                with accelerator.accumulate(self.critic):
                    labels, actions, text = batch.get("label"), batch.get("actions"), Text.of(batch)
                    out = core.loss(self.critic, clip, step_seed(seed, CRITIC), labels, actions, text)
                    accelerator.backward(out.loss)
                self.meter.add(out, batch["skipped"])
            self.critic_norm = optimizer_step(
                accelerator,
                self.critic,
                self.c_opt,
                self.c_sched,
                self.critic_cfg,
                trainer.state,
                trainer.output,
            )
        return self.grad_norm

    def logs(self, steps: int, seconds: float) -> dict[str, float]:
        trainer, cfg = self.trainer, self.config.train
        critic = self.meter.flush(trainer.accelerator, trainer.state)
        sums = torch.stack([self.dmd_sum, self.grad_sum]) / max(self.count, 1)
        loss, score_difference = trainer.accelerator.reduce(sums, "mean").tolist()
        per_step = cfg.gradient_accumulation * (1 if self.ode else self.config.self_forcing.critic_steps)
        self.dmd_sum.zero_(), self.grad_sum.zero_()
        self.count = 0
        return {
            "generator/ode_loss" if self.ode else "generator/dmd_loss": loss,
            **{f"critic/{key}": value for key, value in critic.items()},
            "generator/score_difference": score_difference,
            "generator/grad_norm": float(self.grad_norm),
            "critic/grad_norm": float(self.critic_norm),
            "lr": self.g_sched.get_last_lr()[0],
            "rollouts_per_s": steps * per_step * cfg.batch_size * trainer.world / seconds,
        }


def critic_train_config(config: Config) -> TrainConfig:
    """The train section as the critic's optimiser reads it: the self_forcing section's critic betas, weight
    decay and clipping over train's."""
    sf, cfg = config.self_forcing, config.train
    given = {
        "betas": sf.critic_betas,
        "weight_decay": sf.critic_weight_decay,
        "max_grad_norm": sf.critic_max_grad_norm,
    }
    return dataclasses.replace(cfg, **{key: value for key, value in given.items() if value is not None})


def load_negative(path: str, teacher: Backbone) -> Text:
    """The negative prompt's embeddings (`dforce encode-text --prompt`), for the teacher's text guidance."""
    if teacher.text_dim is None:
        raise ConfigError("self_forcing.negative_prompt: the teacher reads no text (built without text_dim)")
    try:
        text = Text.load(path)
    except ValueError as error:
        raise ConfigError(f"self_forcing.negative_prompt: {error}") from None
    if text.states.shape[0] != 1 or text.states.shape[2] != teacher.text_dim:
        raise ConfigError(
            f"self_forcing.negative_prompt: {path} holds {list(text.states.shape)}; one prompt of the "
            f"teacher's width: [1, L, {teacher.text_dim}]"
        )
    return text
