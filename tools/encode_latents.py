"""Video shards -> latent shards, for training in latent space.

    python tools/encode_latents.py "data/train-*.tar" --vae models/vae --out data/latents --size 256

The autoencoder is any diffusers autoencoder saved in a local folder (`save_pretrained`): an image one
(AutoencoderKL) encodes frame by frame, a video one (a Conv3d encoder: Wan, CogVideoX, LTX, ...) the
whole clip at once. Each output sample keeps the key and the json record of its video and holds
`latent.npy`: float16 `[T', C, h, w]`, the posterior mean, unscaled. The record's `latent` entry holds
the scaling (`scaling_factor`, `shift_factor`, or per-channel `latents_mean` / `latents_std`), which
the loader applies, so `DataConfig(shards=...)` reads latent shards like video shards. With temporal
compression, per-frame `actions` and `states` no longer line up with latent frames and are dropped.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dforce.clips import FRAME_FIELDS, parse_size, resize_crop
from dforce.data import to_float
from dforce.decode import VIDEO_EXTENSIONS, SkipSample, decode_video
from dforce.reading import read_samples
from dforce.shards import ShardSink, ShardSummary


def load_autoencoder(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers autoencoder from a local folder, by the class its config.json names."""
    import diffusers

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {path}: expected a folder written by save_pretrained")
    name = json.loads(config_file.read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "encode"):
        raise ValueError(f"{path}: {name!r} is not a diffusers autoencoder")
    return cls.from_pretrained(path, torch_dtype=dtype).to(device).eval()


def is_video_autoencoder(vae: torch.nn.Module) -> bool:
    """Whether the encoder mixes frames: its first convolution is 3D."""
    conv = next(m for m in vae.encoder.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d))
    return isinstance(conv, torch.nn.Conv3d)


@torch.no_grad()
def encode(vae: torch.nn.Module, video: torch.Tensor, batch_frames: int = 16) -> torch.Tensor:
    """Pixels `[T, C, H, W]` in [-1, 1] -> unscaled latents `[T', C', h, w]` (posterior mean)."""

    def mean(x: torch.Tensor) -> torch.Tensor:
        out = vae.encode(x.to(vae.device, vae.dtype))
        return out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents

    if is_video_autoencoder(vae):
        clip = video.permute(1, 0, 2, 3)[None]  # [1, C, T, H, W]
        return mean(clip)[0].permute(1, 0, 2, 3)  # [T', C', h, w]
    return torch.cat([mean(chunk) for chunk in video.split(batch_frames)])


def scaling(vae: torch.nn.Module) -> dict:
    """How the loader turns stored latents into training targets: per-channel statistics or factors."""
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return {"latents_mean": list(config.latents_mean), "latents_std": list(config.latents_std)}
    return {
        "scaling_factor": config.get("scaling_factor") or 1.0,
        "shift_factor": config.get("shift_factor") or 0.0,
    }


def encode_latents(
    shards: str,
    out: str | Path,
    vae_path: str | Path,
    *,
    size: int | tuple[int, int] | None = None,
    batch_frames: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    prefix: str = "train",
    maxcount: int = 1000,
    overwrite: bool = False,
) -> ShardSummary:
    """Encode every video sample of `shards` (resized and centre-cropped to `size`) into latent shards."""
    vae = load_autoencoder(vae_path, device, dtype)
    info = {"autoencoder": type(vae).__name__, "path": str(vae_path), **scaling(vae)}
    summary = ShardSummary()
    with ShardSink(out, prefix, maxcount=maxcount, overwrite=overwrite) as sink:
        for sample in read_samples(shards):
            summary.videos += 1
            source = f"{sample['__url__']}#{sample['__key__']}"
            field = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
            try:
                if field is None:
                    raise SkipSample(f"no video in fields {sorted(sample)}")
                record = json.loads(sample["json"]) if "json" in sample else {}
                pixels = resize_crop(decode_video(sample[field]), size)  # [T, C, H, W] uint8
            except (SkipSample, ValueError) as reason:
                summary.skipped.append((source, str(reason)))
                continue
            latent = encode(vae, to_float(pixels), batch_frames).float().cpu()  # [T', C', h, w]
            if len(latent) != len(pixels):
                record = {k: v for k, v in record.items() if k not in FRAME_FIELDS}
            record["latent"] = {**info, "frames": len(pixels), "shape": list(latent.shape)}
            buffer = io.BytesIO()
            np.save(buffer, latent.numpy().astype(np.float16), allow_pickle=False)
            sink.write({"__key__": sample["__key__"], "latent.npy": buffer.getvalue(), "json": record})
            summary.samples += 1
    summary.shards = sink.shards
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", help="video shards: a list (a::b), glob or brace pattern")
    parser.add_argument("--vae", required=True, help="local folder of a diffusers autoencoder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--size", default=None, help="N (square) or HxW: scale to cover and centre-crop first"
    )
    parser.add_argument(
        "--batch-frames", type=int, default=16, help="frames per forward pass (image autoencoders)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        summary = encode_latents(
            args.shards,
            args.out,
            args.vae,
            size=parse_size(args.size) if args.size else None,
            batch_frames=args.batch_frames,
            device=args.device,
            dtype=getattr(torch, args.dtype),
            prefix=args.prefix,
            maxcount=args.maxcount,
            overwrite=args.overwrite,
        )
    except ValueError as error:
        sys.exit(f"encode_latents: {error}")
    print(summary)


if __name__ == "__main__":
    main()
