"""Videos in and out of sampling: a clip to continue (a video file or a shard sample), and generated frames
written as MP4 (H.264 through `dforce.data.shards.encode_video`) and GIF (Pillow), alone or beside the real
ones.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dforce.data.clips import LATENT_FIELD
from dforce.data.decode import VIDEO_EXTENSIONS, SkipSample, Video
from dforce.data.reading import read_samples
from dforce.data.shards import encode_video

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")


def read_clip(source: str | Path, index: int = 0) -> tuple[Tensor, float | None]:
    """uint8 frames [T, C, H, W] and the frame rate (None if unknown) of a video file, or of sample
    `index` of webdataset shards (a .tar path, glob or brace pattern)."""
    source = str(source)
    is_shards = source.endswith(SHARD_SUFFIXES) or any(char in source for char in "*?[{")
    try:
        if not is_shards:
            if not Path(source).is_file():
                raise ValueError(f"{source}: no such video file")
            data, record = Path(source).read_bytes(), {}
        else:
            sample = next(itertools.islice(read_samples(source), index, None), None)
            if sample is None:
                raise ValueError(f"{source}: fewer than {index + 1} samples")
            if LATENT_FIELD in sample:
                raise ValueError(f"{source}: sample {sample['__key__']} holds latents, not a video")
            field = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            if field is None:
                raise ValueError(
                    f"{source}: sample {sample['__key__']} holds no video ({', '.join(VIDEO_EXTENSIONS)})"
                )
            data, record = sample[field], json.loads(sample.get("json", b"{}"))
        video = Video(data)
        if video.frames == 0:
            raise SkipSample("zero frames")
        frames = video.read(range(video.frames))  # [T, C, H, W]
    except SkipSample as error:
        raise ValueError(f"{source}: {error}") from None
    fps = record.get("fps") or video.fps
    return frames, float(fps) if fps and fps > 0 else None


def to_uint8(video: Tensor) -> Tensor:
    """Float frames [T, C, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (the inverse of
    `dforce.data.loader.to_float`); one channel is shown as grey."""
    if video.shape[1] not in (1, 3):
        raise ValueError(f"can write 1 or 3 channels, got {video.shape[1]}: decode latents to pixels first")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1)  # [T, H, W, 3]


def side_by_side(left: Tensor, right: Tensor) -> Tensor:
    """Frames [T, C, H, W] next to frames [T', C, H, W] (cut or padded with black to T): [T, C, H, 2W]."""
    frames = len(left)
    right = right[:frames]
    if len(right) < frames:
        right = torch.cat([right, right.new_full((frames - len(right), *right.shape[1:]), -1.0)])
    return torch.cat([left, right], dim=-1)


def write_video(path: str | Path, frames: Tensor, fps: float, scale: int = 1) -> list[Path]:
    """Write uint8 frames [T, H, W, 3] as `path` (.mp4) and the same name with .gif, each pixel shown as
    scale x scale. MP4 is yuv420p where the size is even (plays everywhere), yuv444p otherwise."""
    path = Path(path)
    if path.suffix != ".mp4":
        raise ValueError(f"{path}: the output must be a .mp4 file (a .gif is written beside it)")
    frames = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).numpy()
    height, width = frames.shape[1:3]
    path.parent.mkdir(parents=True, exist_ok=True)
    pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    path.write_bytes(encode_video(frames, fps, pix_fmt=pix_fmt))
    gif = path.with_suffix(".gif")
    images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]
    images[0].save(gif, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return [path, gif]
