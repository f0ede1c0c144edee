"""Self-forcing: a few-step generator trained on its own rollouts with the reverse KL (seed 000, section 5).

Swapping p_data and p_theta in the likelihood gives the reverse KL, whose gradient through a generated
clip x = G(z) is the distribution-matching one (DMD, Yin et al. 2024):

    grad = E_t [ (score_fake(x_t, t) - score_data(x_t, t)) dx_t / dtheta ]
         ~ E_t [ (x0_fake(x_t) - x0_teacher(x_t)) / |x - x0_teacher| ] dx / dtheta

with x_t the generated clip noised to per-frame levels from a trajectory weighting, x0_teacher the frozen
teacher's estimate (history guidance optional) and x0_fake a critic's, trained with the ordinary denoising
loss on generated clips. The generator rolls out exactly as `dforce sample` does (`sampler.generate`: block
by block, KV cache, finished blocks committed detached at the context-noise level, past the horizon with
the rolling cache), except that each block ends at a random exit step whose x0 estimate is the block:
the steps before it run without gradients, and only blocks inside the loss window keep their exit step's
graph. Exit steps and the window come from a seed shared by every process, so every rank's graph is alike.

One step: `gradient_accumulation` generator micro-steps, then `critic_steps` critic updates (the first on
the generator's own clips, the others on fresh rollouts). With `init: ode` the first `ode_steps` steps
regress the generator onto the teacher's many-step DDIM samples, from the states of the teacher's ODE
path at the generator's levels. Checkpoints hold all three models, both optimisers, the generator's EMA
and the counters, so rerunning the command resumes exactly; the generator's EMA is exported.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dforce.config import Config, ConfigError, SelfForcingConfig
from dforce.data import to_float
from dforce.loss import DenoisingLoss
from dforce.model import CausalVideoTransformer
from dforce.noise import NoiseSchedule
from dforce.sampler import History, Sampler, chunk_schedule, denoise_step, generate, load_model
from dforce.train import (
    CHECKPOINTS,
    MODEL,
    Meter,
    begin,
    clip_batches,
    ema_weights,
    export_model,
    flat_config,
    held_out_clips,
    make_accelerator,
    make_optimizer,
    optimizer_step,
    save_checkpoint,
    step_seed,
    trainable,
    validate,
)
from dforce.trajectory import get_weighting

PLAN = 1  # seed key of the draws every process shares: exit steps and the loss window


@dataclasses.dataclass(frozen=True)
class Plan:
    """One rollout's shape: where the loss window starts and where each block exits."""

    window_start: int  # first frame (of context + generated) in the loss window
    exit_rows: list[int]  # per generated block: the scheduling-matrix row whose x0 estimate is the block


def plan_rollout(seed: int, sf: SelfForcingConfig, horizon: int, block: int, total: int) -> Plan:
    """The loss window (`horizon` frames of the `total` rolled out, holding at least one generated frame,
    in whole blocks) and a random exit row in 0..steps-1 per generated block, from `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    first = max(0, sf.context_frames - horizon + block) // block  # the window must reach a new block
    last = (total - horizon) // block
    start = int(torch.randint(first, last + 1, (), generator=generator)) * block
    blocks = -(-(start + horizon - sf.context_frames) // block)
    return Plan(start, torch.randint(0, sf.steps, (blocks,), generator=generator).tolist())


class SelfForcing:
    """The rollout and the losses of self-forcing, apart from the loop: pure functions of the models and
    seeds. `generator`, `critic` and `teacher` may be wrapped by Accelerate."""

    def __init__(self, config: Config, schedule: NoiseSchedule, net: CausalVideoTransformer) -> None:
        self.sf = sf = config.self_forcing
        self.schedule, self.parameterization = schedule, config.noise.parameterization
        self.horizon, self.block = net.config.num_frames, net.config.frames_per_block
        if sf.context_frames % self.block or sf.sink % self.block:
            raise ConfigError(f"self_forcing.context_frames and sink must be whole blocks of {self.block}")
        self.total = sf.rollout_frames or self.horizon  # context + generated frames per clip
        if not sf.context_frames < self.total or self.total < self.horizon or self.total % self.block:
            raise ConfigError(
                f"self_forcing.rollout_frames={self.total} must be whole blocks of {self.block}, at least "
                f"the horizon {self.horizon} and more than context_frames={sf.context_frames}"
            )
        if config.data.clip_frames != self.horizon:
            raise ConfigError(
                f"data.clip_frames={config.data.clip_frames} must be the teacher's horizon {self.horizon}"
            )
        self.sampler = Sampler("ddim")
        self.matrix, self.window = chunk_schedule(
            net, schedule.levels, "autoregressive", sf.steps, block=self.block, shift=sf.shift
        )
        weighting = get_weighting(sf.weighting, self.horizon, schedule.levels)
        self.loss = DenoisingLoss(
            schedule,
            self.parameterization,
            weighting,
            level_weight=config.loss.level_weight,
            level_weight_options=config.loss.level_weight_options,
            teacher_layout=config.loss.teacher_layout and self.block == 1,
            level_range=(sf.min_level, sf.max_level),
        )

    def history(self, model: nn.Module, labels: Tensor | None, actions: Tensor | None) -> History:
        return History(
            model,
            self.schedule,
            self.parameterization,
            self.window,
            labels=labels,
            actions=actions,
            context_noise=self.sf.context_noise,
            sink=self.sf.sink,
        )

    def rollout(self, model: nn.Module, batch: dict, seed: int, plan: Plan) -> Tensor:
        """The loss window of a rollout after the batch's context: [B, horizon, C, H, W], carrying the exit
        steps' graphs (when gradients are enabled) for the generated blocks inside it."""
        video = batch["video"]  # [B, T, C, H, W] float on the device
        context = video[:, : self.sf.context_frames]
        history = self.history(model, batch.get("label"), batch.get("actions"))
        generator = torch.Generator(video.device).manual_seed(seed)
        if len(context[0]):
            history.commit(context, generator)
        before = max(0, plan.window_start - self.sf.context_frames)  # generated frames before the window
        new_frames = plan.window_start + self.horizon - self.sf.context_frames
        exits = plan.exit_rows
        with torch.no_grad():
            head = (
                generate(history, before, self.matrix, self.sampler, video, generator, exits)
                if before
                else None
            )
        tail = generate(
            history,
            new_frames - before,
            self.matrix,
            self.sampler,
            video,
            generator,
            exits[before // self.block :],
        )
        clip = torch.cat([context] + ([head] if head is not None else []) + [tail], dim=1)
        return clip[:, plan.window_start :]

    def distribution_matching(
        self, teacher: nn.Module, critic: nn.Module, clip: Tensor, seed: int, real: int, batch: dict
    ) -> tuple[Tensor, Tensor]:
        """The generator's loss on a window clip [B, T, C, H, W] whose first `real` frames are data: a
        regression whose gradient in `clip` is the normalised score difference; -> (loss, mean |grad|)."""
        labels, actions = batch.get("label"), batch.get("actions")
        with torch.no_grad():
            state = self.loss.draw(clip.detach(), seed, labels, actions)
            x_t, levels = state.inputs["sample"], state.levels
            teacher_pred = teacher(**state.inputs).float()
            if self.sf.guidance != 1:
                unconditional = self.loss.draw(clip.detach(), seed, labels, actions, drop_history=True)
                teacher_pred = teacher_pred + (self.sf.guidance - 1) * (
                    teacher_pred - teacher(**unconditional.inputs).float()
                )
            x0_real = self.schedule.to_x0_eps(teacher_pred, x_t.float(), levels, self.parameterization)[0]
            x0_fake = self.schedule.to_x0_eps(
                critic(**state.inputs).float(), x_t.float(), levels, self.parameterization
            )[0]
            scale = (clip.detach().float() - x0_real).abs().mean(dim=(2, 3, 4), keepdim=True).clamp(min=1e-6)
            grad = (x0_fake - x0_real) / scale  # [B, T, C, H, W]
            weights = state.weights.clone()
            weights[:, :real] = 0  # data frames are not the generator's
        target = (clip.float() - grad).detach()
        error = 0.5 * (clip.float() - target).square().mean(dim=(2, 3, 4))  # [B, T]
        loss = (error * weights).sum(1).mean()
        return loss, grad.abs().mean()


def train_self_forcing(config: Config) -> Path:
    """Train (or resume) self-forcing from `config.self_forcing.teacher`; return the exported generator."""
    sf, cfg, output = config.self_forcing, config.train, Path(config.output_dir)
    if config.model:
        raise ConfigError("model: self-forcing takes the teacher's architecture; remove the model section")
    teacher, noise = load_model(sf.teacher)
    config = dataclasses.replace(config, noise=noise)  # the teacher's schedule, exported with the generator
    accelerator = make_accelerator(config)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    schedule = noise.build().to(device)
    core = SelfForcing(config, schedule, teacher)

    teacher.requires_grad_(False)
    teacher.attention_backend = cfg.attention_backend
    generator, critic = (trainable(load_model(sf.teacher)[0].train(), cfg, device) for _ in range(2))
    steps = cfg.max_steps + (sf.ode_steps if sf.init == "ode" else 0)  # the ODE regression comes first
    (g_opt, g_sched), (c_opt, c_sched) = (
        make_optimizer(net, cfg, lr, steps, world)
        for net, lr in ((generator, cfg.lr), (critic, sf.critic_lr or cfg.lr))
    )
    generator, critic, g_opt, c_opt, g_sched, c_sched = accelerator.prepare(
        generator, critic, g_opt, c_opt, g_sched, c_sched
    )
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True)  # frozen: placed, autocast, no DDP
    ema, state = begin(accelerator, generator, config)  # the generator's EMA

    clips = held_out_clips(config, accelerator) if config.validation.shards else None
    meter = Meter(schedule.levels, device)
    dmd_sum, grad_sum, count = torch.zeros((), device=device), torch.zeros((), device=device), 0
    ode_steps = sf.ode_steps if sf.init == "ode" else 0
    ode_done = min(state.step, ode_steps)  # an ODE step reads a batch a micro-step, a later one critic_steps
    consumed = cfg.gradient_accumulation * (ode_done + (state.step - ode_done) * sf.critic_steps)
    batches = clip_batches(config, rank, world, consumed=consumed)

    def next_batch() -> dict:
        batch = next(batches)
        out = {
            "video": to_float(batch["video"].to(device, non_blocking=True)),
            "skipped": int(batch["skipped"]),
        }
        for key in "label", "actions":
            if key in batch:
                out[key] = batch[key].to(device)
        return out

    accelerator.init_trackers("dforce", config=flat_config(config))
    progress = tqdm(
        total=steps, initial=state.step, desc="self-forcing", disable=not accelerator.is_main_process
    )
    tick, tick_step = time.perf_counter(), state.step
    while state.step < steps:
        ode = state.step < ode_steps
        fakes = []
        for micro in range(cfg.gradient_accumulation):
            batch = next_batch()
            shared = step_seed(config.seed, state.step, micro, PLAN)  # the same on every process
            seed = step_seed(config.seed, state.step, rank, micro)
            with accelerator.accumulate(generator):
                if ode:
                    loss = ode_regression(core, teacher, generator, batch, seed)
                else:
                    plan = plan_rollout(shared, sf, core.horizon, core.block, core.total)
                    clip = core.rollout(generator, batch, seed, plan)
                    real = max(0, sf.context_frames - plan.window_start)
                    loss, grad = core.distribution_matching(teacher, critic, clip, seed, real, batch)
                    fakes.append((clip.detach(), batch))
                    grad_sum += grad
                accelerator.backward(loss)
                dmd_sum += loss.detach().float()
                count += 1
        grad_norm = optimizer_step(accelerator, generator, g_opt, g_sched, cfg, state, output)
        if grad_norm.isfinite():
            ema.step(generator.parameters())
        critic_norm = torch.zeros(())
        for update in range(0 if ode else sf.critic_steps):
            for micro in range(cfg.gradient_accumulation):
                seed = step_seed(config.seed, state.step, rank, micro, update + 2)
                if update == 0:
                    clip, batch = fakes[micro]
                else:
                    batch = next_batch()
                    plan = plan_rollout(
                        step_seed(config.seed, state.step, micro, update + 2, PLAN),
                        sf,
                        core.horizon,
                        core.block,
                        core.total,
                    )
                    with torch.no_grad():
                        clip = core.rollout(generator, batch, seed, plan)
                with accelerator.accumulate(critic):
                    out = core.loss(critic, clip, seed, batch.get("label"), batch.get("actions"))
                    accelerator.backward(out.loss)
                meter.add(out, batch["skipped"])
            critic_norm = optimizer_step(accelerator, critic, c_opt, c_sched, cfg, state, output)
        state.step += 1
        progress.update()

        last = state.step == steps
        if state.step % cfg.log_every == 0 or last:
            logs = {f"critic/{key}": value for key, value in meter.flush(accelerator, state).items()}
            sums = accelerator.reduce(torch.stack([dmd_sum, grad_sum]) / max(count, 1), "mean").tolist()
            elapsed, tick = time.perf_counter() - tick, time.perf_counter()
            per_step = cfg.gradient_accumulation * (1 if ode else sf.critic_steps)
            clips_done = (state.step - tick_step) * per_step * cfg.batch_size * world
            tick_step = state.step
            logs.update(
                {
                    "generator/ode_loss" if ode else "generator/dmd_loss": sums[0],
                    "generator/score_difference": sums[1],
                    "generator/grad_norm": float(grad_norm),
                    "critic/grad_norm": float(critic_norm),
                    "lr": g_sched.get_last_lr()[0],
                    "rollouts_per_s": clips_done / elapsed,
                }
            )
            dmd_sum.zero_(), grad_sum.zero_()
            count = 0
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{sums[0]:.4f}", refresh=False)
        if config.validation.shards and (state.step % config.validation.every == 0 or last):
            with ema_weights(ema, generator):
                logs = validate(config, generator, accelerator, state.step, clips)
            accelerator.log(logs, step=state.step)
            accelerator.print(f"step {state.step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in logs.items()))
        if state.step % cfg.checkpoint_every == 0 or last:
            export_model(accelerator, generator, ema, config, output / MODEL)
            save_checkpoint(accelerator, output / CHECKPOINTS, state.step, cfg.keep_checkpoints)
    progress.close()
    accelerator.end_training()
    return output / MODEL


def ode_pairs(core: SelfForcing, teacher: nn.Module, batch: dict, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's deterministic (DDIM) rollout over the horizon after the batch's context, through the
    generator's levels and `ode_sampling_steps` levels per block: -> the clip [B, T, C, H, W], and the
    states on its ODE path at each of the generator's levels [S, B, T, C, H, W] with those levels [S]."""
    sf, video = core.sf, batch["video"]
    context = video[:, : sf.context_frames]
    coarse = core.matrix[:-1, 0]  # [S] the generator's levels, from K down
    fine = torch.linspace(core.schedule.levels, 0, sf.ode_sampling_steps + 1).round().long()
    path = torch.cat([coarse, fine]).unique().flip(0)  # [P] descending, K ... 0
    history = core.history(teacher, batch.get("label"), batch.get("actions"))
    generator = torch.Generator(video.device).manual_seed(seed)
    if len(context[0]):
        history.commit(context, generator)
    states = torch.zeros(len(coarse), *video[:, : core.horizon].shape, device=video.device, dtype=video.dtype)
    states[:, :, : sf.context_frames] = context
    clip = [context]
    for start in range(sf.context_frames, core.horizon, core.block):
        x = torch.randn(video[:, start : start + core.block].shape, generator=generator, device=video.device)
        for level, next_level in itertools.pairwise(path.tolist()):
            at = (coarse == level).nonzero()
            if len(at):
                states[int(at[0]), :, start : start + core.block] = x
            levels = torch.full(x.shape[:2], int(level), device=x.device)
            x, _ = denoise_step(history, x, levels, torch.full_like(levels, int(next_level)), core.sampler)
        history.commit(x, generator)
        clip.append(x)
    return torch.cat(clip, dim=1), states, coarse


def ode_regression(
    core: SelfForcing, teacher: nn.Module, generator: nn.Module, batch: dict, seed: int
) -> Tensor:
    """The generator's x0 estimate from a random state of the teacher's ODE path per frame, beside the
    teacher's clean clip as context (the teacher-forcing layout), regressed onto the ODE's end."""
    with torch.no_grad():
        clip, states, levels = ode_pairs(core, teacher, batch, seed)
    batch_size, frames = clip.shape[:2]
    pick = torch.randint(
        0, len(levels), (batch_size, frames // core.block), generator=torch.Generator().manual_seed(seed)
    )
    pick = pick.repeat_interleave(core.block, dim=1).to(clip.device)  # [B, T] row per frame
    x = states.gather(0, pick[None, :, :, None, None, None].expand(1, *clip.shape))[0]  # [B, T, C, H, W]
    frame_levels = levels.to(clip.device)[pick]  # [B, T]
    context_levels = torch.full_like(frame_levels, core.sf.context_noise)
    context = core.schedule.add_noise(
        clip,
        torch.randn(clip.shape, generator=torch.Generator(clip.device).manual_seed(seed), device=clip.device),
        context_levels,
    )
    pred = generator(
        x,
        core.schedule.timesteps(frame_levels),
        labels=batch.get("label"),
        actions=batch.get("actions"),
        context=context,
        context_timesteps=core.schedule.timesteps(context_levels),
    )
    x0 = core.schedule.to_x0_eps(pred.float(), x.float(), frame_levels, core.parameterization)[0]
    error = (x0 - clip.float()).square().mean(dim=(2, 3, 4))[:, core.sf.context_frames :]  # [B, generated]
    return error.mean()
