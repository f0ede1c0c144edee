"""Video shards -> latent shards (`dforce encode-latents`), for training in latent space.

Each output sample keeps the key and json record of its video and holds `latent.npy`: float16
`[T', c, h, w]`, the posterior's mode, unscaled. The record's `latent` entry is the `LatentSpace`
(`dforce.data.latents`: the VAE, its compressions and normalisation, which the loader applies) with
`pixel_frames` and `latent_frames`. With temporal compression, per-frame `actions` and `states` no longer
line up with latent frames: they move to the record's `pixel_fields` (per pixel frame, which `dforce eval`
scores decoded frames against) and do not reach training batches.

The first sample that decodes fixes what is checked before anything is encoded or written: a length a
causal VAE cannot encode exactly (Wan: 1 + 4k frames) or a size it does not divide is an error naming
the nearest valid lengths. A later sample that fails the same check is skipped and listed with its reason.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dforce.data.clips import FRAME_FIELDS, resize_crop
from dforce.data.decode import VIDEO_EXTENSIONS, SkipSample, decode_video
from dforce.data.loader import to_float
from dforce.data.reading import count_samples, expand_shards, read_samples
from dforce.data.shards import ShardSink, ShardSummary
from dforce.data.vae import encode, load_vae


def _videos(
    urls: list[str], size: int | tuple[int, int] | None, summary: ShardSummary, progress: bool
) -> Iterator[tuple[dict, str, dict, torch.Tensor]]:
    """(sample, video field, record, uint8 pixels `[T, C, H, W]`) of every sample that decodes; the others
    are counted in `summary` with their reason."""
    try:
        total = count_samples(urls)
    except ValueError:  # remote shards: no count without reading them
        total = None
    for sample in tqdm(read_samples(urls), total=total, unit="video", disable=None if progress else True):
        summary.videos += 1
        try:
            field = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            if field is None:
                raise SkipSample(f"no video in fields {sorted(sample)}")
            record = json.loads(sample["json"]) if "json" in sample else {}
            if not isinstance(record, dict):
                raise SkipSample("the json record is not an object")
            yield sample, field, record, resize_crop(decode_video(sample[field]), size)
        except (SkipSample, ValueError) as reason:
            summary.skipped.append((f"{sample['__url__']}#{sample['__key__']}", str(reason)))


def encode_latents(
    shards: str | list[str],
    out: str | Path,
    vae_path: str | Path,
    *,
    subfolder: str | None = None,
    size: int | tuple[int, int] | None = None,
    tiling: bool = False,
    slicing: bool = False,
    batch_frames: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: str = "train",
    maxcount: int = 1000,
    overwrite: bool = False,
    keep_video: bool = False,
    progress: bool = False,
) -> ShardSummary:
    """Encode every video sample of `shards` (resized and centre-cropped to `size` first) into latent
    shards in `out`; `keep_video` also stores the video file, for comparing decoded pixels with it."""
    if batch_frames < 1:
        raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
    vae, space = load_vae(vae_path, subfolder, device, dtype, tiling=tiling, slicing=slicing)
    info = space.to_dict()
    summary = ShardSummary()
    videos = _videos(expand_shards(shards), size, summary, progress)
    first = next(videos, None)
    if first is not None:
        frames, _, height, width = first[3].shape
        try:
            space.latent_shape(frames, height, width)
        except ValueError as error:
            raise ValueError(f"{first[0]['__url__']}#{first[0]['__key__']}: {error}") from None
    with ShardSink(out, prefix, maxcount=maxcount, overwrite=overwrite) as sink:
        for sample, field, record, pixels in [] if first is None else itertools.chain([first], videos):
            try:
                latent = encode(vae, space, to_float(pixels), batch_frames).cpu()  # [T', c, h, w]
            except ValueError as reason:
                summary.skipped.append((f"{sample['__url__']}#{sample['__key__']}", str(reason)))
                continue
            if space.temporal_compression != 1:  # kept per pixel frame, for scoring decoded frames
                pixel = {k: record[k] for k in FRAME_FIELDS if k in record}
                record = {k: v for k, v in record.items() if k not in FRAME_FIELDS}
                if pixel:
                    record["pixel_fields"] = pixel
            record["latent"] = {**info, "pixel_frames": len(pixels), "latent_frames": len(latent)}
            buffer = io.BytesIO()
            np.save(buffer, latent.numpy().astype(np.float16), allow_pickle=False)
            written = {"__key__": sample["__key__"], "latent.npy": buffer.getvalue(), "json": record}
            if keep_video:
                written[field] = sample[field]
            sink.write(written)
            summary.samples += 1
    summary.shards = sink.shards
    return summary
