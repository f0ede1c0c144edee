"""The denoising loss: a trajectory weighting picks the state and the frame weights, the noise schedule
noises the clip, and each frame's error is weighted by its edge weight times the per-level weight.

Everything random comes from `seed`, so a step's loss is a function of (weights, batch, seed): the
trainer seeds it by (run seed, step, rank, micro-step) and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from dforce.data.text import Text
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.scheduling import time_shift
from dforce.diffusion.trajectory import Teacher, Weighting


@dataclass
class LossOutput:
    loss: Tensor  # [] the weighted loss, to backpropagate
    error: Tensor  # [B, T] detached: per-frame mean squared error times the per-level weight
    levels: Tensor  # [B, T] the state each clip was trained at (the noisy half, in the teacher layout)
    trained: Tensor  # [B, T] bool: frames that carry loss (weight > 0)


@dataclass
class NoisedClips:
    inputs: dict[str, Tensor | None]  # the model's keyword arguments: sample, timesteps, labels, ...
    levels: Tensor  # [B, T] each frame's level (of `sample`)
    weights: Tensor  # [B, T] each frame's loss weight; 0 for context
    noise: Tensor  # [B, T, C, H, W] the noise in `sample`


class DenoisingLoss:
    """Expected edge KL of a trajectory weighting, up to the per-level weight's scale (seed 000).

    With the `teacher` weighting (over frames, or over blocks: `get_weighting(..., block=b)` for a model of
    b frames per block), the staircase states of all blocks are trained in one forward through the model's
    teacher-forcing layout (clean clip as context, block J at its own level): each frame gets weight 1/n,
    which is the weighting's expectation over the staircase position, so the loss has the same scale as
    drawing one position per clip.

    `context_noise` (teacher layout only) puts each context frame at a level drawn from 0..context_noise:
    the model learns to read a slightly noised history, which a rollout's `context_noise` then gives it
    in place of its own imperfect frames (noise augmentation against drift). The other weightings need
    no such option: their states already hold noised history. `level_shift` warps the levels of the
    frames that carry loss by `time_shift` and `level_range` then clamps them (self-forcing's distribution
    matching: Self-Forcing shifts its levels by 5 and skips the extremes, as DMD does).
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        parameterization: str,
        weighting: Weighting,
        level_weight: str = "simple",
        level_weight_options: dict | None = None,
        teacher_layout: bool = True,
        drop_history: float = 0.0,
        drop_labels: float = 0.0,
        context_noise: int = 0,
        level_range: tuple[int, int] | None = None,
        drop_text: float = 0.0,
        level_shift: float = 1.0,
    ) -> None:
        self.schedule, self.parameterization, self.weighting = schedule, parameterization, weighting
        self.level_weight, self.level_weight_options = level_weight, dict(level_weight_options or {})
        self.teacher_layout = teacher_layout and isinstance(weighting.base, Teacher)
        self.drop_history, self.drop_labels, self.drop_text = drop_history, drop_labels, drop_text
        if context_noise and not self.teacher_layout:
            raise ValueError(
                f"context_noise is for the teacher layout; weighting {weighting!r} already trains on "
                "noised history"
            )
        if not 0 <= context_noise <= schedule.levels:
            raise ValueError(f"context_noise must be a level in 0..{schedule.levels}, got {context_noise}")
        self.context_noise = context_noise
        if level_range is not None and not 0 < level_range[0] <= level_range[1] <= schedule.levels:
            raise ValueError(f"level_range must be 0 < low <= high <= {schedule.levels}, got {level_range}")
        self.level_range = level_range
        if level_shift <= 0:
            raise ValueError(f"level_shift must be > 0, got {level_shift}")
        self.level_shift = level_shift
        one = torch.ones(1, 1, dtype=torch.long)
        schedule.loss_weight(level_weight, one, parameterization, **self.level_weight_options)  # checks names

    def draw(
        self,
        x0: Tensor,
        seed: int,
        labels: Tensor | None = None,
        actions: Tensor | None = None,
        null_label: int | None = None,
        drop_history: bool | None = None,
        text: Text | None = None,
    ) -> NoisedClips:
        """The noised state of clean clips x0 [B, T, C, H, W] that the loss trains on, as model inputs.

        Self-forcing reads the teacher and the critic at the same states. `drop_history=True` forces every
        clip's history to pure noise (the unconditional branch of history guidance) without changing
        any other draw; labels [B] are dropped to `null_label` with chance `drop_labels`, and each clip's
        text to the null text with chance `drop_text`.
        """
        batch, frames, device = x0.shape[0], x0.shape[1], x0.device
        if frames != self.weighting.frames:
            raise ValueError(
                f"clips have {frames} frames but the weighting was built for {self.weighting.frames}"
            )
        cpu = torch.Generator().manual_seed(seed)
        noise_generator = torch.Generator(device).manual_seed(seed)
        if self.schedule.alpha.device != device:
            self.schedule = self.schedule.to(device)  # once, not a copy per step
        schedule = self.schedule
        if self.teacher_layout:  # one level per block (of the weighting's `block` frames)
            block = self.weighting.block
            levels = torch.randint(1, schedule.levels + 1, (batch, frames // block), generator=cpu)
            levels = levels.repeat_interleave(block, 1)  # [B, T]
            weights = torch.full((batch, frames), 1.0 / frames)
            context_levels = torch.randint(0, self.context_noise + 1, (batch, frames // block), generator=cpu)
            context_levels = context_levels.repeat_interleave(block, 1)  # [B, T]
        else:
            levels, weights = self.weighting.sample(batch, cpu)  # [B, T] each
        if self.level_shift != 1:
            shifted = time_shift(levels / schedule.levels, self.level_shift) * schedule.levels
            levels = torch.where(weights > 0, shifted.round().long().clamp(min=1), levels)
        if self.level_range is not None:
            levels = torch.where(weights > 0, levels.clamp(*self.level_range), levels)
        dropped = torch.rand(batch, generator=cpu) < self.drop_history  # [B]
        if drop_history is not None:
            dropped = torch.full((batch,), drop_history)
        drop_labels = torch.rand(batch, generator=cpu) < self.drop_labels  # [B]
        drop_text = torch.rand(batch, generator=cpu) < self.drop_text  # [B]
        levels, weights = levels.to(device), weights.to(device)
        if labels is not None and self.drop_labels > 0:
            labels = torch.where(drop_labels.to(device), null_label, labels)
        inputs = {"labels": labels, "actions": actions}
        if text is not None:
            inputs.update((text.dropped(drop_text) if self.drop_text > 0 else text).kwargs())
        noise = torch.randn(x0.shape, generator=noise_generator, device=device, dtype=x0.dtype)
        if self.teacher_layout:
            # History dropped: the context is the clip at level K (pure noise).
            context_levels = torch.where(dropped[:, None], schedule.levels, context_levels).to(device)
            context_noise = torch.randn(x0.shape, generator=noise_generator, device=device, dtype=x0.dtype)
            context = schedule.add_noise(x0, context_noise, context_levels)
            inputs.update(context=context, context_timesteps=schedule.timesteps(context_levels))
        else:
            # History dropped: the frames that carry no loss (the context) go to level K.
            history = dropped[:, None].to(device) & (weights == 0)  # [B, T]
            levels = torch.where(history, schedule.levels, levels)
        x_t = schedule.add_noise(x0, noise, levels)
        inputs.update(sample=x_t, timesteps=schedule.timesteps(levels))
        return NoisedClips(inputs=inputs, levels=levels, weights=weights, noise=noise)

    def __call__(
        self,
        model: nn.Module,
        x0: Tensor,
        seed: int,
        labels: Tensor | None = None,
        actions: Tensor | None = None,
        text: Text | None = None,
    ) -> LossOutput:
        """x0 [B, T, C, H, W] clean clips (labels [B], actions [B, T, A], text if the model takes them)."""
        null_label = extract_model_from_parallel(model).null_label if labels is not None else None
        state = self.draw(x0, seed, labels, actions, null_label, text=text)
        pred = model(**state.inputs)  # [B, T, C, H, W]
        levels, weights = state.levels, state.weights
        target = self.schedule.target(x0, state.noise, levels, self.parameterization)
        level_weight = self.schedule.loss_weight(
            self.level_weight, levels, self.parameterization, **self.level_weight_options
        ).float()  # [B, T]
        error = (pred.float() - target.float()).square().mean(dim=(2, 3, 4)) * level_weight  # [B, T]
        loss = (error * weights).sum(1).mean()
        return LossOutput(loss=loss, error=error.detach(), levels=levels, trained=weights > 0)
