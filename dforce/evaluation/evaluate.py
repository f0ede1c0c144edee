"""`dforce eval --model DIR --data SHARDS`: how well a model continues held-out clips, frame by frame, inside
and past its training horizon, and how likely it finds them.

A rollout continues each clip from its first `context_frames` frames; every generated frame is scored
against the real one (`dforce.evaluation.metrics`: MSE, PSNR, SSIM; for bouncing balls, the distance of each
ball, found by its colour, from the recorded physics, and whether all balls are found). Frame index t counts
from the clip's first frame, so t < horizon (the model's `num_frames`) lies inside the training horizon.
Scores are averaged over clips per frame index (PSNR as the mean of each frame's dB). A model that reads
text is given each clip's own (the shards' `text.npy`, `dforce encode-text`), in rollouts and likelihoods.

The likelihoods score the first horizon frames of each clip (`dforce.diffusion.likelihood`): the ELBO along
the path the rollout itself takes (its scheduling matrix at one-level resolution, chunk after chunk), and,
if asked, the probability-flow ODE. Both are reported in bits per 8-bit subpixel: the density of [-1, 1]
pixels per unit of 0..255, i.e. bits per dimension + log2(127.5).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dforce.data.clips import DataConfig, decode_sample, latent_space, resize_crop
from dforce.data.decode import VIDEO_EXTENSIONS, SkipSample, decode_video
from dforce.data.latents import LatentSpace
from dforce.data.loader import to_float
from dforce.data.reading import read_samples
from dforce.data.text import MASK, STATES, Text
from dforce.data.vae import Decoder
from dforce.diffusion.likelihood import NLL, elbo, ode_nll
from dforce.diffusion.noise import NoiseConfig
from dforce.diffusion.recipe import SamplingRecipe
from dforce.diffusion.rollout import chunk_schedule, rollout, truncate
from dforce.diffusion.scheduling import step_count
from dforce.diffusion.trajectory import get_weighting
from dforce.evaluation.metrics import ball_speed, find_balls, frame_metrics, position_errors
from dforce.evaluation.plots import plot_curves
from dforce.evaluation.summary import summarise
from dforce.models.backbone import Backbone

BITS_8BIT = math.log2(127.5)  # from bits per [-1, 1] unit to bits per 0..255 unit
METRICS = ("mse", "psnr", "ssim", "ball_error", "balls_found", "ball_speed")
LABELS = {
    "mse": "MSE",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "ball_error": "ball position error (px)",
    "balls_found": "frames with all balls found",
    "ball_speed": "ball speed / recorded speed",
}


@dataclass
class Clips:
    """Held-out clips and what their records say about them. For a latent model `video` holds the
    model's latents and `pixels` their decoding (the VAE's reconstruction, which scores compare with),
    `original` the stored video's frames where the shards kept them (`encode-latents --keep-video`)."""

    video: Tensor  # [N, T, C, H, W]: float pixels in [-1, 1], or normalized latents
    balls: list[dict[str, Tensor]] | None  # per clip: states [P, n, 2] in pixel frames, colors, radius
    labels: Tensor | None = None  # [N]
    actions: Tensor | None = None  # [N, T, A]
    text: Text | None = None  # [N, L, D], [N, L]: the clips' text (`dforce encode-text`)
    space: LatentSpace | None = None  # the latents' (None: pixels)
    pixels: Tensor | None = None  # [N, P, C, H, W] the decoded latents (None: `video` is pixels)
    original: Tensor | None = None  # [N, P, C, H, W] the stored video, for latents

    def real(self) -> Tensor:
        """The real frames as pixels [N, P, C, H, W]."""
        return self.video if self.pixels is None else self.pixels

    def pixel_frames(self, frames: int) -> int:
        """Pixel frames that the first `frames` model frames stand for."""
        return frames if self.space is None else self.space.pixel_frames(frames)


def _ball_record(record: dict, states: Tensor, shape: tuple[int, int]) -> dict[str, Tensor] | None:
    """The balls of a bouncing-balls record in the pixels of frames resized (`resize_crop`: scaled to
    cover, centre-cropped) from the record's height x width to `shape`."""
    if "colors" not in record or "radius" not in record:
        return None
    height, width = record.get("height", shape[0]), record.get("width", shape[1])
    scale = max(shape[0] / height, shape[1] / width)
    scaled = max(shape[0], round(height * scale)), max(shape[1], round(width * scale))
    top, left = (scaled[0] - shape[0]) // 2, (scaled[1] - shape[1]) // 2
    xy = states[..., :2].double() * torch.tensor([scaled[1] / width, scaled[0] / height])
    xy = xy - torch.tensor([left, top], dtype=torch.float64)
    return {
        "states": xy,  # [T, n, 2]
        "colors": torch.tensor(record["colors"], dtype=torch.float64),  # [n, 3]
        "radius": torch.tensor(record["radius"], dtype=torch.float64) * scale,  # [n]
    }


def read_clips(
    shards: str | list[str],
    count: int,
    frames: int,
    size: int | list[int] | None = None,
    decoder: Decoder | None = None,
) -> Clips:
    """The first `count` samples of `shards` in order, each cut to its first `frames` frames, resized to
    `size` (None keeps the stored size). With a `decoder` the shards hold latents of its space, and the
    clips carry their decoding (and the stored video, where kept) as pixels."""
    space = None if decoder is None else decoder.space
    config = DataConfig(shards=shards, clip_frames=frames, clip_start=0, size=size, shuffle=False)
    rng = np.random.default_rng(0)  # unused: clips start at frame 0 and are centre-cropped
    videos, decoded, balls, labels, actions, originals, texts = [], [], [], [], [], [], []
    for sample in read_samples(shards):
        if len(videos) == count:
            break
        where = f"{sample.get('__url__', shards)}: sample {sample['__key__']}"
        try:
            clip = decode_sample(sample, config, rng)
            record = json.loads(sample["json"]) if "json" in sample else {}
        except SkipSample as error:
            raise ValueError(f"{where}: {error}") from None
        if clip["latent"] != (space is not None):
            kind = "latents; dforce eval scores them through the model's VAE" if clip["latent"] else "a video"
            raise ValueError(f"{where} holds {kind}, the model is a {'latent' if space else 'pixel'} model")
        if space is not None and (difference := space.mismatch(latent_space(record))):
            raise ValueError(f"{where}: latents of another VAE than the model's: {difference}")
        video = clip["video"] if space else to_float(clip["video"])  # [T, C, H, W]
        pixels = video if decoder is None else decoder(video)  # [P, C, H, W]
        videos.append(video)
        decoded.append(pixels)
        if space is not None:
            field = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            stored = decode_video(sample[field])[: len(pixels)] if field else None
            if stored is not None and len(stored) == len(pixels):
                originals.append(to_float(resize_crop(stored, list(pixels.shape[-2:]))))
            record = {**record, **record.get("pixel_fields", {})}  # per pixel frame, as encoded
        states = record.get("states")
        if states is not None and pixels.shape[1] == 3:
            states = torch.tensor(states, dtype=torch.float64)[: len(pixels)]
            balls.append(_ball_record(record, states, tuple(pixels.shape[-2:])))
        else:
            balls.append(None)
        labels.append(clip.get("label"))
        actions.append(clip.get("actions"))
        texts.append((clip[STATES], clip[MASK]) if STATES in clip else None)
    if len(videos) < count:
        raise ValueError(f"{shards}: {len(videos)} samples, fewer than the {count} clips asked for")
    video = torch.stack(videos)
    return Clips(
        video=video,
        balls=balls if all(b is not None for b in balls) else None,
        labels=torch.stack(labels) if all(x is not None for x in labels) else None,
        actions=torch.stack(actions) if all(x is not None for x in actions) else None,
        text=(
            Text(torch.stack([s for s, _ in texts]), torch.stack([m for _, m in texts]))
            if all(x is not None for x in texts)
            else None
        ),
        space=space,
        pixels=None if decoder is None else torch.stack(decoded),  # decoded once, above
        original=torch.stack(originals) if space is not None and len(originals) == count else None,
    )


@dataclass
class EvalSettings(SamplingRecipe):
    """What an evaluation does: a sampling recipe (`dforce eval`: the model's, with the flags given over
    it) and what is scored; stored with its results, so a cached result is reused only for the same."""

    context_frames: int = 4
    seed: int = 0
    batch_size: int = 16
    elbo_draws: int = 32  # 0: no ELBO
    ode_steps: int = 0  # 0: no ODE likelihood
    ode_probes: int = 4
    ode_path: str = "autoregressive"  # autoregressive | sync


def _batches(clips: Clips, size: int, model: Backbone):
    """(clips picked, their video [B, T, C, H, W], what the model reads of them on its device: labels [B],
    actions [B, T, A], and text if the model reads text) per batch of `size` clips."""
    device = model.device
    text = clips.text if model.text_dim is not None else None
    for start in range(0, len(clips.video), size):
        part = slice(start, start + size)
        conditions = {
            "labels": None if clips.labels is None else clips.labels[part].to(device),
            "actions": None if clips.actions is None else clips.actions[part].to(device),
            "text": None if text is None else Text(text.states[part], text.mask[part]).to(device),
        }
        yield part, clips.video[part], conditions


def score_frames(
    fake: Tensor, real: Tensor, balls: list[dict[str, Tensor]] | None, first: int
) -> dict[str, Tensor]:
    """Scores of frames fake against real [B, F, C, H, W], float64 [B, F] each; `balls` (per clip, for its
    whole clip) are compared from frame `first` on."""
    scores = frame_metrics(fake, real)
    if balls is not None:
        error, all_found, speed = [], [], []
        for frames, b in zip(fake, balls, strict=True):
            states = b["states"][first : first + fake.shape[1]]
            positions, found = find_balls(frames, b["colors"], b["radius"])  # once for all three scores
            error.append(position_errors(positions, found, states))
            all_found.append(found.all(dim=1).double())
            speed.append(ball_speed(positions, found, states))
        scores["ball_error"], scores["balls_found"] = torch.stack(error), torch.stack(all_found)
        scores["ball_speed"] = torch.stack(speed)
    return scores


def copy_last_frame(clips: Clips, context_frames: int) -> dict[str, Tensor]:
    """The scores of the simplest forecast, the last context frame held still: a baseline [N, F] each
    (in pixel frames, F after the context's)."""
    video, known = clips.real(), clips.pixel_frames(context_frames)
    still = video[:, known - 1 : known].expand(-1, video.shape[1] - known, -1, -1, -1)
    return score_frames(still, video[:, known:], clips.balls, known)


def rollout_scores(
    model: Backbone,
    noise: NoiseConfig,
    clips: Clips,
    settings: EvalSettings,
    decoder: Decoder | None = None,
) -> tuple[dict[str, Tensor], float]:
    """Per clip and generated pixel frame, float64 [N, P - context's pixel frames] each: `mse`, `psnr`,
    `ssim`, and with balls `ball_error` (nan where none is found), `balls_found` (1.0 if all are) and
    `ball_speed` (`dforce.evaluation.metrics.ball_speed`); for a
    latent model (`decoder`) against the decoded real latents, and as `*_vs_original` against the stored
    video too where the shards kept it. And the model frames generated per second (wall time of the
    rollouts alone, batches of `batch_size` clips)."""
    device, known = model.device, settings.context_frames
    if not 0 <= known < clips.video.shape[1]:
        raise ValueError(f"context_frames must be in 0..{clips.video.shape[1] - 1}, got {known}")
    schedule, first = noise.build(), clips.pixel_frames(known)
    generator = torch.Generator(device).manual_seed(settings.seed)
    scores: dict[str, list[Tensor]] = {}
    seconds = 0.0
    for part, real, conditions in _batches(clips, settings.batch_size, model):
        start = time.perf_counter()
        fake = rollout(
            model,
            schedule,
            noise.parameterization,
            real[:, :known].to(device),
            real.shape[1] - known,
            **settings.rollout_kwargs(),
            generator=generator,
            **conditions,
        ).cpu()  # [B, T, C, H, W], the context included; the copy waits for the device
        seconds += time.perf_counter() - start
        if decoder is not None:
            fake = torch.stack([decoder(clip) for clip in fake])  # [B, P, C, H, W] pixels
        balls = None if clips.balls is None else clips.balls[part]
        batch = score_frames(fake[:, first:], clips.real()[part, first:], balls, first)
        if clips.original is not None:
            versus = frame_metrics(fake[:, first:], clips.original[part, first:])
            batch |= {f"{name}_vs_original": value for name, value in versus.items()}
        for name, value in batch.items():
            scores.setdefault(name, []).append(value)
    generated = clips.video.shape[0] * (clips.video.shape[1] - known)
    return {name: torch.cat(values) for name, values in scores.items()}, generated / seconds


def rollout_path(model: Backbone, levels: int, settings: EvalSettings) -> Tensor:
    """The path a rollout of `settings` takes through one horizon of frames, at one-level resolution:
    LongTensor [S+1, horizon] (its chunks one after another, each from all-K to all-0)."""
    options = {"block": settings.block} if settings.block is not None else {}
    if settings.scheduling == "pyramid":  # the offset in levels: `offset` steps of levels / steps each
        options["offset"] = round((settings.offset or 1) * levels / step_count(settings.steps))
    matrix, _ = chunk_schedule(model, levels, settings.scheduling, levels, settings.chunk, **options)
    horizon, width = model.horizon, matrix.shape[1]
    rows = []
    for start in range(0, horizon, width):
        part = truncate(matrix, min(width, horizon - start))  # [S'+1, n]
        full = torch.full((len(part), horizon), levels, dtype=torch.long)
        full[:, :start] = 0
        full[:, start : start + part.shape[1]] = part
        rows.append(full if start == 0 else full[1:])  # a chunk's first row is the last one's final state
    return torch.cat(rows)


def likelihoods(model: Backbone, noise: NoiseConfig, clips: Clips, settings: EvalSettings) -> dict[str, NLL]:
    """`elbo` along the rollout's path and `ode` (if `ode_steps`) of the clips' first horizon frames."""
    horizon, levels = model.horizon, noise.levels
    if clips.video.shape[1] < horizon:
        raise ValueError(
            f"the likelihoods score one horizon of {horizon} frames; clips have {clips.video.shape[1]}: "
            "pass longer clips, or no ELBO and ODE"
        )
    schedule, device = noise.build(), model.device
    weighting = get_weighting("schedule", horizon, levels, schedule=rollout_path(model, levels, settings))
    parts: dict[str, list[NLL]] = {}
    for _, real, extra in _batches(clips, settings.batch_size, model):
        x0 = real[:, :horizon].to(device)  # the likelihoods cut actions to its frames
        if settings.elbo_draws:
            draws, seed = settings.elbo_draws, settings.seed
            nll = elbo(
                model, schedule, noise.parameterization, x0, weighting, draws=draws, seed=seed, **extra
            )
            parts.setdefault("elbo", []).append(nll)
        if settings.ode_steps:
            nll = ode_nll(
                model,
                schedule,
                noise.parameterization,
                x0,
                path=settings.ode_path,
                block=model.frames_per_block,
                steps=settings.ode_steps,
                probes=settings.ode_probes,
                seed=settings.seed,
                **extra,
            )
            parts.setdefault("ode", []).append(nll)
    return {
        name: NLL(torch.cat([p.nats for p in nlls]), torch.cat([p.sem for p in nlls]), nlls[0].dims)
        for name, nlls in parts.items()
    }


def evaluate(
    model: Backbone, noise: NoiseConfig, clips: Clips, settings: EvalSettings, decoder: Decoder | None = None
) -> dict:
    """Scores per pixel frame index and their summary: a JSON-ready dict. A latent model's likelihoods are
    of its latents, in bits per latent dimension."""
    scores, frames_per_s = rollout_scores(model, noise, clips, settings, decoder)
    horizon, first = clips.pixel_frames(model.horizon), clips.pixel_frames(settings.context_frames)
    index = list(range(first, clips.real().shape[1]))
    frames, summary = summarise(scores, index, horizon)
    _, baseline = summarise(copy_last_frame(clips, settings.context_frames), index, horizon)
    if settings.elbo_draws or settings.ode_steps:
        unit, offset = ("bits_per_dim", BITS_8BIT) if clips.space is None else ("bits_per_latent_dim", 0.0)
        for name, nll in likelihoods(model, noise, clips, settings).items():
            bits, sem = nll.bits_per_dim(offset=offset)
            summary[f"{name}_{unit}"], summary[f"{name}_sem"] = bits, sem
    return {
        "horizon": horizon,
        "clips": len(clips.video),
        "settings": dataclasses.asdict(settings),
        "summary": summary,
        "copy_last_frame": baseline,  # the same scores of the last context frame held still
        "frames_per_s": frames_per_s,
        "frames": frames,
    }


def write_report(result: dict, out: str | Path, title: str = "") -> list[Path]:
    """`metrics.json`, `metrics.csv` (one row per frame index) and `metrics.png` in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "metrics.json", out / "metrics.csv"]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    frames, horizon = result["frames"], result["horizon"]
    names = [name for name in METRICS if name in frames]
    with paths[1].open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["frame", "inside_horizon", *names])
        for i, t in enumerate(frames["index"]):
            writer.writerow([t, int(t < horizon), *(frames[name][i] for name in names)])
    panels = {LABELS[name]: {"rollout": (frames["index"], frames[name], None)} for name in names}
    paths.append(
        plot_curves(panels, out / "metrics.png", "frame index", horizon, "training horizon", title or None)
    )
    return paths
