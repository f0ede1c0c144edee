"""The training loop, for any objective: Accelerate, EMA, logging, validation, checkpoints and resume.

Reads top to bottom: the objective builds and prepares its models and optimisers, the EMA of its main
model and the counters are loaded from the newest readable checkpoint, then every step the objective
takes one optimiser step from its batches, and the loop updates the EMA, logs, validates, exports and
checkpoints. Rerunning the same command resumes: every random draw of a step comes from (seed, step,
rank, micro-step) and the data position from the step, so the resumed run is the uninterrupted one.
Multi-process: `accelerate launch -m dforce train CONFIG` (see docs/training.md).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from dforce.data.latents import LatentSpace
from dforce.data.loader import check_text, make_loader, probe_shards, to_float
from dforce.data.text import TEXT_KEYS
from dforce.data.vae import load_decoder
from dforce.models.backbone import Backbone
from dforce.training.checkpoint import CHECKPOINTS, MODEL, export_model, resume, save_checkpoint
from dforce.training.config import PRECISIONS, Config, ConfigError
from dforce.training.ema import EMA, ema_weights, trained_parameters
from dforce.training.engine import TrainState
from dforce.training.run_record import Start, move_aside, record_start
from dforce.training.trackers import start_trackers
from dforce.training.validation import held_out_clips, held_out_data, validate


class Objective(Protocol):
    """What the loop asks of an objective (`dforce.training.objectives`): built by `(config, trainer)`, it has
    made and prepared its models, optimisers and schedulers with `trainer.accelerator`, so that
    `save_state` checkpoints them all."""

    name: str  # the progress bar's label
    config: Config  # the run's config as the objective completed it (written to config.yaml)
    model: torch.nn.Module  # the prepared model whose EMA is validated and exported
    steps: int  # optimiser steps of the whole run

    def batches_read(self, step: int) -> int:
        """Micro-batches this rank has read before `step` (the data position on resume)."""

    def step(self, step: int, batches: Iterator[dict]) -> torch.Tensor:
        """One optimiser step of `model` (and whatever else it trains); -> `model`'s gradient norm,
        not finite if the step was skipped."""

    def logs(self, steps: int, seconds: float) -> dict[str, float]:
        """What to log of the `steps` steps taken in `seconds` since the last call; the first entry is
        the headline the progress bar shows."""


def make_accelerator(config: Config) -> Accelerator:
    cfg, output = config.train, Path(config.output_dir)
    precision, note = mixed_precision(cfg.mixed_precision, os.environ)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.gradient_accumulation,
        log_with=cfg.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    if note:
        accelerator.print(note)
    return accelerator


def mixed_precision(configured: str | None, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The config's `train.mixed_precision`, else the launch's (`accelerate launch --mixed_precision`, or
    its config file), else `no`; and, when both are set and differ, the line that says the config's wins.
    (Read before the Accelerator exists: any process state made earlier would be the Accelerator's.)"""
    launched = environ.get("ACCELERATE_MIXED_PRECISION")
    chosen = configured or launched or "no"
    if chosen not in PRECISIONS:
        raise ConfigError(
            f"the launch asks for mixed precision {launched!r}; dforce trains in {' or '.join(PRECISIONS)} "
            "(set train.mixed_precision, or launch with --mixed_precision bf16)"
        )
    if configured and launched and launched != configured:
        return (
            chosen,
            f"mixed precision: {configured} (train.mixed_precision) wins over the launch's {launched}",
        )
    return chosen, None


class Trainer:
    """The Accelerator and the counters of one run; `fit` runs an objective to its last step."""

    def __init__(self, config: Config, start: Start, space: LatentSpace | None = None) -> None:
        self.config, self.given, self.start, self.space = config, config, start, space
        self.output = Path(config.output_dir)
        self.accelerator = make_accelerator(config)
        self.device = self.accelerator.device
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.state = TrainState()
        if self.accelerator.is_main_process:  # before anything of this run is written
            for line in move_aside(start):
                print(line)
        self.accelerator.wait_for_everyone()

    def fit(self, make_objective: type[Objective]) -> Path:
        """Train (or resume) with the objective; -> the exported EMA model directory."""
        accelerator, state = self.accelerator, self.state

        def say(line: str) -> None:  # on a line of its own, above the progress bar if there is one
            if accelerator.is_main_process:
                tqdm.write(line)

        objective = make_objective(self.config, self)
        config = self.config = objective.config
        text_dim = accelerator.unwrap_model(objective.model).text_dim
        check_data_text(config, text_dim)  # before a checkpoint is loaded or a step taken
        check_frames(config, accelerator.unwrap_model(objective.model), self.space)
        cfg, val = config.train, config.validation
        block = accelerator.unwrap_model(objective.model).frames_per_block
        if val.shards and val.context_frames % block:  # its rollouts continue whole blocks
            raise ConfigError(
                f"validation.context_frames={val.context_frames}: the model denoises blocks of {block} "
                "frames; give a multiple, or validation.shards=null for a model of one block"
            )
        ema = begin(accelerator, objective.model, self.given, config, self.start, state)

        clips = held_out_clips(config, accelerator) if val.shards else None
        decoder = (
            None  # latents -> pixels for the rollouts, with the VAE loaded now: a missing one fails here
        )
        if clips is not None and self.space is not None:
            decoder = load_decoder(self.space, self.device)
        batches = self.batches(objective.batches_read(state.step), text=text_dim is not None)
        recipe = config.sampling_recipe()  # how it is validated: exported beside it as sampling.json
        start_trackers(accelerator, config)
        progress = tqdm(  # a bar on a terminal (`disable=None`); else a plain line per log step
            total=objective.steps,
            initial=state.step,
            desc=objective.name,
            disable=None if accelerator.is_main_process else True,
        )
        # Plain lines where the bar is off (stderr no terminal) or stdout goes to a file (`make demo > log`).
        plain = accelerator.is_main_process and (progress.disable or not sys.stdout.isatty())
        tick, tick_step = time.perf_counter(), state.step
        began, began_step = tick, state.step
        while state.step < objective.steps:
            grad_norm = objective.step(state.step, batches)
            if grad_norm.isfinite():
                ema.step(trained_parameters(objective.model))
            state.step += 1
            progress.update()

            last = state.step == objective.steps
            if state.step % cfg.log_every == 0 or last:
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                logs = objective.logs(state.step - tick_step, elapsed)
                tick_step = state.step
                accelerator.log(logs, step=state.step)
                progress.set_postfix(loss=f"{next(iter(logs.values())):.4f}", refresh=False)
                if plain:
                    seconds = (tick - began) / (state.step - began_step) * (objective.steps - state.step)
                    say(log_line(objective.name, state.step, objective.steps, logs, seconds))
            if val.shards and (state.step % val.every == 0 or last):
                with ema_weights(ema, objective.model):
                    logs = validate(config, objective.model, accelerator, state.step, clips, decoder)
                accelerator.log(logs, step=state.step)
                say(f"step {state.step}: " + ", ".join(f"{k[4:]} {v:.4g}" for k, v in logs.items()))
                if last:
                    say(
                        f"held-out next-frame MSE: {logs['val/next_frame_mse_1step']:.4f} as the one-step "
                        f"posterior mean, {logs['val/next_frame_mse']:.4f} sampled in "
                        f"{recipe.steps} steps; copying the last frame: "
                        f"{logs['val/copy_last_frame_mse']:.4f}"
                    )
            if state.step % cfg.checkpoint_every == 0 or last:  # export first: a kill between redoes both
                export_model(
                    accelerator, objective.model, ema, config.noise, self.output / MODEL, self.space, recipe
                )
                save_checkpoint(accelerator, self.output / CHECKPOINTS, state.step, cfg.keep_checkpoints)
        progress.close()
        model = self.output / MODEL
        if accelerator.is_main_process and model.is_dir() and not (model / recipe.FILE).is_file():
            recipe.save(model)  # a run that finished before models carried their sampling recipe
        accelerator.end_training()
        return self.output / MODEL

    def batches(self, consumed: int, text: bool = False) -> Iterator[dict]:
        """This rank's batches without end after the first `consumed`, on the device: `video` float
        [B, T, C, H, W], `skipped` (int), and `label` [B], `actions` [B, T, A] when the data has them,
        and with `text` (a model that reads it) `encoder_hidden_states` [B, L, D], `encoder_attention_mask`
        [B, L]."""
        for batch in clip_batches(self.config, self.rank, self.world, consumed):
            out = {
                "video": to_float(batch["video"].to(self.device, non_blocking=True)),
                "skipped": int(batch["skipped"]),
            }
            for key in ("label", "actions", *(TEXT_KEYS if text else ())):
                if key in batch:
                    out[key] = batch[key].to(self.device)
            yield out


def log_line(name: str, step: int, steps: int, logs: Mapping[str, float], eta: float) -> str:
    """The progress bar's news as one line, for a log that is not a terminal: the step, the headline (the
    first entry of `logs`), the objective's throughput (its `*_per_s` entry) and the time left."""
    key, value = next(iter(logs.items()))
    parts = [f"{key} {value:.4f}"]
    parts += [f"{v:.1f} {k.removesuffix('_per_s')}/s" for k, v in logs.items() if k.endswith("_per_s")][:1]
    return f"{name} step {step}/{steps}: " + ", ".join([*parts, f"ETA {tqdm.format_interval(eta)}"])


def data_space(config: Config) -> LatentSpace | None:
    """The latent space of the run's shards (None for videos), read from their first samples before
    anything is built; the held-out shards must hold the same kind, of the same VAE."""
    spaces = {}
    for key, data in (("data.shards", config.data), ("validation.shards", held_out_data(config))):
        if key == "data.shards" or config.validation.shards:
            try:
                spaces[key] = probe_shards(data)
            except ValueError as error:
                raise ConfigError(f"{key}: {error}") from None
    space, held = spaces["data.shards"], spaces.get("validation.shards", spaces["data.shards"])
    if (space is None) != (held is None):
        kinds = ("videos", "latents") if space is None else ("latents", "videos")
        raise ConfigError(f"validation.shards: data.shards hold {kinds[0]}, the held-out shards {kinds[1]}")
    if space is not None and (difference := space.mismatch(held)):
        raise ConfigError(f"validation.shards: latents of another VAE than data.shards': {difference}")
    return space


def check_frames(config: Config, model: Backbone, space: LatentSpace | None) -> None:
    """The data's frames against the model's (C, H, W), before a step: the channels of latent shards (or
    RGB pixels) and `data.size`. What shards do not say (a latent's size) the first forward checks."""
    channels, *size = model.frame_shape
    reads = f"the model ({type(model).__name__}) reads frames of (C, H, W) {tuple(model.frame_shape)}"
    data = "RGB pixel frames" if space is None else f"{space.vae_class} latents of {space.channels} channels"
    if channels != (3 if space is None else space.channels):
        raise ConfigError(f"data.shards: the shards hold {data}; {reads}")
    if space is None and config.data.size is not None:
        wanted = [config.data.size] * 2 if isinstance(config.data.size, int) else list(config.data.size)
        if wanted != size:
            raise ConfigError(f"data.size: {config.data.size} gives {wanted[0]}x{wanted[1]} frames; {reads}")


def check_data_text(config: Config, text_dim: int | None) -> None:
    """A model that reads text (`text_dim` set) refuses shards without text embeddings at once, naming
    them and the key they lack (`data.check_text`), the held-out shards as well."""
    if text_dim is None:
        return
    for key, data in (("data.shards", config.data), ("validation.shards", held_out_data(config))):
        if key == "data.shards" or config.validation.shards:
            try:
                check_text(data, text_dim)
            except ValueError as error:
                raise ConfigError(f"{key}: {error}") from None


def begin(
    accelerator: Accelerator,
    model: torch.nn.Module,
    given: Config,
    config: Config,
    start: Start,
    state: TrainState,
) -> EMA:
    """The EMA of the prepared `model`'s trained weights (FSDP's shards, if sharded), registered for
    checkpointing with the counters and loaded with them from the newest readable checkpoint unless the
    run starts afresh; the start recorded beside (`dforce.training.run_record`)."""
    output = Path(config.output_dir)
    cfg = config.train
    ema = EMA(trained_parameters(model), decay=cfg.ema_decay, update_after_step=cfg.ema_start, foreach=True)
    accelerator.register_for_checkpointing(ema, state)
    resumed = None if start.fresh else resume(accelerator, output / CHECKPOINTS)
    if accelerator.is_main_process:
        record_start(output, given, config, start, state.step, resumed)
    if resumed:
        changed = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in start.changed.items())
        accelerator.print(
            f"resumed from {resumed} at step {state.step}" + (f"; changed: {changed}" if changed else "")
        )
    return ema


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
