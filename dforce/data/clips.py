"""Where clips come from and how they are cut (`DataConfig`), and one shard sample made into a clip.

A shard sample is a video file (`mp4`, `webm`, `mkv`, `avi`, ...) or a `latent.npy` array, next to a
`json` record (`fps`, `label`, `caption`, per-frame `actions`, ...; for latents their `LatentSpace` under
`latent`), and, once `dforce encode-text` has run, the caption's token embeddings `text.npy` [n, D].
The clip's frames, their resizing and cropping come from a random generator given by the caller, so a
clip is a pure function of (sample, seed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dforce.data.decode import VIDEO_EXTENSIONS, SkipSample, Video
from dforce.data.latents import LatentSpace
from dforce.data.text import MASK, STATES, pad_tokens

LATENT_FIELD = "latent.npy"
TEXT_FIELD = "text.npy"  # float16 [n, D]: the caption's n token embeddings (`dforce encode-text`)
CAPTION = "caption"  # the json record's key of a clip's text
FRAME_FIELDS = ("actions", "states")  # json arrays with one row per frame, cut like the video


@dataclass
class DataConfig:
    """Where clips come from and how they are cut. Plain types only, so that YAML can fill it."""

    shards: str | list[str] = "outputs/data/bouncing_balls/train-*.tar"  # list, glob, brace pattern, URLs
    clip_frames: int = 16
    frame_stride: int = 1  # every n-th frame of the stored video (or latent)
    fps: float | None = None  # resample to this frame rate instead of using frame_stride (videos only)
    clip_start: int | None = None  # first frame of every clip; None draws it (causal latents: always 0)
    size: int | list[int] | None = None  # square side or [height, width] of videos; None: the stored size
    crop: str = "center"  # "center" or "random", after scaling the clip to cover `size`
    pixels: str = "float32"  # "float32" in [-1, 1], or "uint8" (4x less to move) for `to_float` on the device
    num_workers: int = 2
    shuffle: bool = True  # shuffle shards and, through a buffer, samples
    shuffle_buffer: int = 256
    resampled: bool = False  # draw each slot's shards with replacement instead of passing over them
    samples_per_epoch: int | None = None  # None counts the samples of local shards
    seed: int = 0
    text_length: int = 512  # text tokens a clip's embeddings are padded to (Wan: 512, as for UMT5)

    def __post_init__(self) -> None:
        if min(self.clip_frames, self.frame_stride, self.shuffle_buffer, self.text_length) < 1:
            raise ValueError("clip_frames, frame_stride, shuffle_buffer and text_length must be >= 1")
        if min(self.num_workers, self.seed) < 0:
            raise ValueError("num_workers and seed must be >= 0")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.pixels not in ("float32", "uint8"):
            raise ValueError(f"pixels must be 'float32' or 'uint8', got {self.pixels!r}")
        if self.size is not None:
            pair = [self.size] * 2 if isinstance(self.size, int) else list(self.size)
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"size must be a positive int or [height, width], got {self.size!r}")


def parse_size(text: str) -> int | tuple[int, int]:
    """'64' -> 64, '64x96' -> (64, 96) as (height, width)."""
    try:
        values = [int(part) for part in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"bad size {text!r}: expected N or HEIGHTxWIDTH, e.g. 64 or 64x96")
    return values[0] if len(values) == 1 else (values[0], values[1])


def resize_crop(
    video: torch.Tensor,
    size: int | Sequence[int] | None,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Scale `[T, C, H, W]` (uint8 or float) to cover `size`, keeping the aspect ratio, then crop to it."""
    if size is None:
        return video
    h, w = (size, size) if isinstance(size, int) else size
    height, width = video.shape[-2:]
    scale = max(h / height, w / width)
    scaled = max(h, round(height * scale)), max(w, round(width * scale))
    if scaled != (height, width):
        video = F.interpolate(video, size=scaled, mode="bilinear", antialias=True, align_corners=False)
    if crop == "random":
        top, left = int(rng.integers(scaled[0] - h + 1)), int(rng.integers(scaled[1] - w + 1))
    else:
        top, left = (scaled[0] - h) // 2, (scaled[1] - w) // 2
    return video[..., top : top + h, left : left + w]


def clip_indices(
    frames: int, clip_frames: int, step: float, start: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Indices of a clip of `clip_frames` frames `step` apart (fractional steps resample the frame rate)."""
    offsets = np.floor(np.arange(clip_frames) * step + 1e-6).astype(np.int64)  # [T]
    span = int(offsets[-1]) + 1
    if frames == 0:
        raise SkipSample("zero frames")
    if start is None:
        if frames < span:
            raise SkipSample(f"too short: {frames} frames, a clip spans {span}")
        start = int(rng.integers(frames - span + 1))
    elif start + span > frames:
        raise SkipSample(f"too short: {frames} frames, a clip from frame {start} spans {span}")
    return start + offsets


def _video_clip(data: bytes, config: DataConfig, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    video = Video(data)
    if config.fps is not None and not video.fps > 0:
        raise SkipSample("unknown frame rate, cannot resample to data.fps")
    step = video.fps / config.fps if config.fps is not None else config.frame_stride
    indices = clip_indices(video.frames, config.clip_frames, step, config.clip_start, rng)
    return resize_crop(video.read(indices), config.size, config.crop, rng), indices  # [T, C, H, W] uint8


def latent_space(record: dict) -> LatentSpace:
    """The `LatentSpace` of a latent sample's json record; ValueError if it has none or an old one."""
    info = record.get("latent")
    if not isinstance(info, dict):
        raise ValueError("the json record has no latent entry")
    try:
        return LatentSpace.from_dict(info)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{error}: re-encode the shards with dforce encode-latents") from None


def check_latent_config(config: DataConfig, space: LatentSpace) -> None:
    """ValueError if `config` cuts clips that latents of `space` cannot give: latents keep the size and
    frame rate they were encoded at, and causal ones start at latent 0, the one that stands for one frame."""
    for name in ("size", "fps"):
        if getattr(config, name) is not None:
            raise ValueError(
                f"data.{name} is {getattr(config, name)}, but latents keep the {name} they were encoded at: "
                f"unset data.{name} for latent shards"
            )
    if space.causal and (config.clip_start not in (None, 0) or config.frame_stride != 1):
        raise ValueError(
            f"{space.vae_class} latents are causal (latent 0 is frame 0, every later one "
            f"{space.temporal_compression} frames): clips start at latent 0 with frame_stride 1, got "
            f"clip_start {config.clip_start} and frame_stride {config.frame_stride}"
        )


def _latent_clip(
    data: bytes, record: dict, config: DataConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    try:
        space = latent_space(record)
    except ValueError as error:
        raise SkipSample(str(error)) from None
    check_latent_config(config, space)  # a config error, not the sample's
    try:
        latent = np.load(io.BytesIO(data), allow_pickle=False)  # [N, C, h, w]
    except (ValueError, OSError, EOFError) as error:
        raise SkipSample(f"unreadable latent: {error}") from error
    if latent.ndim != 4 or latent.shape[1] != space.channels:
        raise SkipSample(f"latent has shape {latent.shape}, expected [frames, {space.channels}, h, w]")
    start = 0 if space.causal else config.clip_start
    indices = clip_indices(len(latent), config.clip_frames, config.frame_stride, start, rng)
    return space.normalize(torch.from_numpy(latent[indices].astype(np.float32))), indices  # [T, C, h, w]


def _text(data: bytes, length: int) -> dict[str, torch.Tensor]:
    """`text.npy` [n, D] -> `encoder_hidden_states` [length, D] (zero after the tokens) and
    `encoder_attention_mask` [length] bool."""
    try:
        tokens = np.load(io.BytesIO(data), allow_pickle=False)  # [n, D]
    except (ValueError, OSError, EOFError) as error:
        raise SkipSample(f"unreadable {TEXT_FIELD}: {error}") from error
    if tokens.ndim != 2:
        raise SkipSample(f"{TEXT_FIELD} has shape {tokens.shape}, expected [tokens, D]")
    try:
        states, mask = pad_tokens(torch.from_numpy(tokens), length)
    except ValueError as error:
        raise SkipSample(f"{error} (data.text_length)") from None
    return {STATES: states, MASK: mask}


def decode_sample(sample: dict, config: DataConfig, rng: np.random.Generator) -> dict:
    """One clip: `video` `[T, C, H, W]` (uint8 pixels, or normalized float latents), `label`, `actions`
    `[T, A]`, `states` `[T, ...]` when the record has them, and the text `encoder_hidden_states`
    `[text_length, D]` and `encoder_attention_mask` `[text_length]` when the sample holds `text.npy`.
    Raises SkipSample with the reason if it cannot."""
    try:
        record = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError) as error:
        raise SkipSample(f"bad json record: {error}") from error
    if not isinstance(record, dict):
        raise SkipSample("the json record is not an object")
    if LATENT_FIELD in sample:
        clip, indices = _latent_clip(sample[LATENT_FIELD], record, config, rng)
    else:
        field = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
        if field is None:
            raise SkipSample(
                f"no video ({', '.join(VIDEO_EXTENSIONS)}) or {LATENT_FIELD} in fields {sorted(sample)}"
            )
        clip, indices = _video_clip(sample[field], config, rng)
    out = {"video": clip, "key": sample["__key__"], "latent": LATENT_FIELD in sample}
    label = record.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        out["label"] = torch.tensor(label)
    if TEXT_FIELD in sample:
        out.update(_text(sample[TEXT_FIELD], config.text_length))
    for name in FRAME_FIELDS:
        if name in record:
            try:
                rows = np.asarray(record[name], dtype=np.float32)  # [N, ...]
            except ValueError as error:
                raise SkipSample(f"{name} is not a numeric array: {error}") from error
            if rows.ndim == 0 or len(rows) <= indices[-1]:
                raise SkipSample(
                    f"{name} has {len(rows) if rows.ndim else 0} rows, the clip needs frame {indices[-1]}"
                )
            out[name] = torch.from_numpy(rows[indices])  # [T, ...]
    return out
