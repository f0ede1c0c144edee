"""Validation: held-out loss per weighting, next-frame error beside copying the last frame, and rollouts
past the horizon beside the real clips; the same clips and seeds at every validation of a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from dforce.data.clips import DataConfig
from dforce.data.loader import make_loader, to_float
from dforce.data.text import Text
from dforce.data.video import side_by_side, to_uint8, write_video
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.recipe import SamplingRecipe
from dforce.diffusion.rollout import rollout
from dforce.models.backbone import Backbone
from dforce.training.config import Config, ConfigError
from dforce.training.engine import make_loss, step_seed
from dforce.training.trackers import log_frames


def held_out_data(config: Config) -> DataConfig:
    """The validation shards, read in order from the first frame of each clip."""
    shards = config.validation.shards
    return dataclasses.replace(config.data, shards=shards, shuffle=False, resampled=False, clip_start=0)


def model_text(model: Backbone, batch: dict, device: torch.device) -> Text | None:
    """The batch's text on `device` for a model that reads text, else None."""
    text = Text.of(batch) if model.text_dim is not None else None
    return None if text is None else text.to(device)


@torch.no_grad()
def validate(
    config: Config,
    model: torch.nn.Module,
    accelerator: Accelerator,
    step: int,
    clips: dict | None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Held-out loss per weighting and next-frame error (sampled, and the one-step posterior mean) next to
    copying the last frame, on the same clips and seeds every time (in the model's space: latents for a
    latent model); the main process also writes rollouts beside the real clips, as pixels through
    `decoder` (latents [T', c, h, w] -> frames [T, C, H, W]) for a latent model."""
    val, device = config.validation, accelerator.device
    data = held_out_data(config)
    net = accelerator.unwrap_model(model).eval()
    schedule = config.noise.build().to(device)
    sums: dict[str, torch.Tensor] = {}
    counts = {"loss": 0, "rollout": 0}  # batches read, should the held-out data hold fewer than asked
    losses = {name: make_loss(config, name, net.frames_per_block, augment=False) for name in val.weightings}
    sampled = config.sampling_recipe()  # what the exported model records (sampling.json)
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
            text = model_text(net, batch, device)
            seed = step_seed(config.seed, i)
            counts[purpose] += 1
            if purpose == "loss":
                for name, loss_fn in losses.items():
                    loss = loss_fn(net, x0, seed, labels=labels, actions=actions, text=text).loss
                    sums[f"val/loss_{name}"] = sums.get(f"val/loss_{name}", 0) + loss
                continue
            context, truth = x0[:, : val.context_frames], x0[:, val.context_frames]
            guesses = {"copy_last_frame_mse": context[:, -1]}
            # One unguided step from pure noise is the posterior mean, the least-squares prediction; the
            # sample is the model's recipe (history guidance included), one frame autoregressively.
            for name, recipe in (
                ("next_frame_mse", sampled.override(scheduling="autoregressive")),
                ("next_frame_mse_1step", SamplingRecipe(steps=1, context_noise=sampled.context_noise)),
            ):
                guesses[name] = rollout(
                    net,
                    schedule,
                    config.noise.parameterization,
                    context,
                    1,
                    **recipe.rollout_kwargs(),
                    labels=labels,
                    actions=actions,
                    text=text,
                    generator=torch.Generator(device).manual_seed(seed),
                )[:, -1]
            for name, guess in guesses.items():
                sums[f"val/{name}"] = sums.get(f"val/{name}", 0) + (guess - truth).square().mean()
    logs = {
        key: accelerator.reduce(value / counts["loss" if "loss_" in key else "rollout"], "mean").item()
        for key, value in sums.items()
    }
    if clips is not None:
        write_rollouts(config, net, schedule, clips, step, accelerator, decoder)
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
    model: Backbone,
    schedule: NoiseSchedule,
    batch: dict,
    step: int,
    accelerator: Accelerator,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Path:
    """Roll out from held-out clips past the horizon; real frames on the right (written by the main
    process), sampled as the exported model's recipe says. Latents are decoded first: the real side is then
    the VAE's reconstruction."""
    val = config.validation
    real = to_float(batch["video"].to(accelerator.device))  # [N, T, C, H, W]
    fake = rollout(
        model,
        schedule,
        config.noise.parameterization,
        real[:, : val.context_frames],
        val.rollout_frames,
        **config.sampling_recipe().rollout_kwargs(),
        labels=batch["label"].to(accelerator.device) if "label" in batch else None,
        actions=batch["actions"].to(accelerator.device) if "actions" in batch else None,
        text=model_text(model, batch, accelerator.device),
        generator=torch.Generator(accelerator.device).manual_seed(config.seed),
    )
    if decoder is not None:
        fake, real = ([decoder(clip) for clip in clips] for clips in (fake, real))  # [T, C, H, W] pixels
    grid = torch.cat([side_by_side(f, r) for f, r in zip(fake, real, strict=True)], dim=-2)  # [T, C, N*H, 2W]
    out = Path(config.output_dir) / "samples" / f"step_{step:08d}.mp4"
    if accelerator.is_main_process:
        frames = to_uint8(grid)  # [T, H, W, 3]
        write_video(out, frames, fps=8, scale=4)
        log_frames(accelerator, "rollout", frames.cpu().numpy(), step)
    return out
