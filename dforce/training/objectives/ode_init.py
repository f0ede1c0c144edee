"""Self-forcing's ODE initialisation: the generator first regresses onto the teacher's many-step
deterministic (DDIM) samples, from the states of the teacher's ODE path at the generator's levels. The
teacher is queried as the distribution-matching stage queries it: with its history and text guidance
(against the negative prompt), in its own blocks (a bidirectional teacher denoises the whole clip at one
level, as Self-Forcing's ODE pairs come from the bidirectional Wan), on `ode_sampling_steps` steps warped by
`ode_shift`."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from dforce.data.text import Text
from dforce.diffusion.rollout import denoise_step
from dforce.diffusion.scheduling import step_grid
from dforce.training.engine import step_seed
from dforce.training.objectives.dmd import SelfForcing


def ode_pairs(core: SelfForcing, teacher: nn.Module, batch: dict, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's deterministic (DDIM) rollout over the horizon after the batch's context, through the
    generator's levels and `ode_sampling_steps` levels per block: -> the clip [B, T, C, H, W], and the
    states on its ODE path at each of the generator's levels [S, B, T, C, H, W] with those levels [S]."""
    sf, video, block = core.sf, batch["video"], core.score_block
    context = video[:, : sf.context_frames]
    coarse = core.matrix[:-1, 0]  # [S] the generator's levels, from K down
    fine = step_grid(sf.ode_sampling_steps, core.schedule.levels, sf.ode_shift).to(coarse.device)
    path = torch.cat([coarse, fine]).unique().flip(0)  # [P] descending, K ... 0
    history = core.history(teacher, batch, guided=True, window=core.horizon - block)
    generator = torch.Generator(video.device).manual_seed(seed)
    if len(context[0]):
        history.commit(context, generator)
    states = torch.zeros(len(coarse), *video[:, : core.horizon].shape, device=video.device, dtype=video.dtype)
    states[:, :, : sf.context_frames] = context
    clip = [context]
    for start in range(sf.context_frames, core.horizon, block):
        x = torch.randn(video[:, start : start + block].shape, generator=generator, device=video.device)
        for level, next_level in itertools.pairwise(path.tolist()):
            at = (coarse == level).nonzero()
            if len(at):
                states[int(at[0]), :, start : start + block] = x
            levels = torch.full(x.shape[:2], int(level), device=x.device)
            x, _ = denoise_step(history, x, levels, torch.full_like(levels, int(next_level)), core.sampler)
        if start + block < core.horizon:
            history.commit(x, generator)
        clip.append(x)
    return torch.cat(clip, dim=1), states, coarse


def ode_regression(
    core: SelfForcing, teacher: nn.Module, generator: nn.Module, batch: dict, seed: int
) -> Tensor:
    """The generator's x0 estimate from a random state of the teacher's ODE path per frame, beside the
    teacher's clean clip as context (the teacher-forcing layout), regressed onto the ODE's end. The ODE's
    noise, the states picked and the context's noise are independent streams of `seed`."""
    with torch.no_grad():
        clip, states, levels = ode_pairs(core, teacher, batch, step_seed(seed, 1))
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
        torch.randn(
            clip.shape,
            generator=torch.Generator(clip.device).manual_seed(step_seed(seed, 2)),
            device=clip.device,
        ),
        context_levels,
    )
    text = Text.of(batch)
    pred = generator(
        x,
        core.schedule.timesteps(frame_levels),
        labels=batch.get("label"),
        actions=batch.get("actions"),
        context=context,
        context_timesteps=core.schedule.timesteps(context_levels),
        **({} if text is None else text.kwargs()),
    )
    x0 = core.schedule.to_x0_eps(pred.float(), x.float(), frame_levels, core.parameterization)[0]
    error = (x0 - clip.float()).square().mean(dim=(2, 3, 4))[:, core.sf.context_frames :]  # [B, generated]
    return error.mean()
