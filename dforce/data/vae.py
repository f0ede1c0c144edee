"""Diffusers autoencoders: one loaded from a local folder with the `LatentSpace` it defines, and pixels
encoded to latents and decoded back.

The known classes and how each states its compressions are `VAES`; any other class is refused rather
than guessed at, since a wrong frame count silently shifts every latent in time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from torch import nn

from dforce.data.latents import LatentSpace, hash_config


def _image(vae: nn.Module) -> tuple[int, int, int]:
    return 1, 2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels


def _wan(vae: nn.Module) -> tuple[int, int, int]:
    # 2**sum and 2**len of `temperal_downsample` (sic), as diffusers' Wan pipelines computed them before
    # the config held `scale_factor_*` (defaults 4 and 8, wrong for a smaller config), times Wan 2.2's patch.
    config = vae.config
    temporal = 2 ** sum(config.temperal_downsample)
    if temporal != 4:  # `AutoencoderKLWan._encode` reads frames 1 + 4k in chunks of 4, whatever the factor
        raise ValueError(
            f"AutoencoderKLWan with temporal compression {temporal}: diffusers encodes its frames in "
            "chunks of 4, so only a 4x temporal compression encodes every frame"
        )
    spatial = 2 ** len(config.temperal_downsample) * (config.get("patch_size") or 1)
    return temporal, spatial, config.z_dim


def _cogvideox(vae: nn.Module) -> tuple[int, int, int]:
    config = vae.config
    spatial = 2 ** (len(config.block_out_channels) - 1)
    return int(config.temporal_compression_ratio), spatial, config.latent_channels


def _ltx(vae: nn.Module) -> tuple[int, int, int]:
    return vae.temporal_compression_ratio, vae.spatial_compression_ratio, vae.config.latent_channels


# class name -> (causal: latent 0 is pixel frame 0 alone, (temporal, spatial, channels) of a loaded VAE)
VAES: dict[str, tuple[bool, Callable[[nn.Module], tuple[int, int, int]]]] = {
    "AutoencoderKL": (False, _image),
    "AutoencoderKLWan": (True, _wan),
    "AutoencoderKLCogVideoX": (True, _cogvideox),
    "AutoencoderKLLTXVideo": (True, _ltx),
}


def _config_file(folder: Path, subfolder: str | None) -> Path:
    if not folder.is_dir():
        raise ValueError(f"no VAE folder {folder}")
    config_file = folder / (subfolder or "") / "config.json"
    if not config_file.is_file():
        pipeline = (folder / "vae/config.json").is_file()
        hint = " (a pipeline folder? its VAE is in subfolder vae)" if pipeline else ""
        raise ValueError(
            f"no config.json in {config_file.parent}: expected a diffusers autoencoder written by "
            f"save_pretrained{hint}"
        )
    return config_file


def _space(vae: nn.Module, name: str, folder: Path, subfolder: str | None) -> LatentSpace:
    causal, compressions = VAES[name]
    temporal, spatial, channels = compressions(vae)
    config = vae.config
    mean, std = config.get("latents_mean"), config.get("latents_std")
    buffers = dict(vae.named_buffers())
    if mean is None and "latents_mean" in buffers:  # LTX keeps them as weights
        mean, std = buffers["latents_mean"].tolist(), buffers["latents_std"].tolist()
    return LatentSpace(
        vae_class=name,
        config_hash=hash_config(config),
        path=str(folder),
        subfolder=subfolder,
        temporal_compression=int(temporal),
        spatial_compression=int(spatial),
        causal=causal,
        channels=int(channels),
        scaling_factor=config.get("scaling_factor"),
        shift_factor=config.get("shift_factor"),
        latents_mean=None if mean is None else [float(v) for v in mean],
        latents_std=None if std is None else [float(v) for v in std],
    )


def load_vae(
    path: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tiling: bool = False,
    slicing: bool = False,
) -> tuple[nn.Module, LatentSpace]:
    """A diffusers autoencoder from a local folder (`subfolder` of it: "vae" in a pipeline folder), in eval
    mode without gradients, and the space of its latents. Refuses other models and unknown autoencoders."""
    folder = Path(path).expanduser().resolve()
    config_file = _config_file(folder, subfolder)
    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in VAES:
        cls = getattr(diffusers, str(name), None)
        what = "an autoencoder dforce does not know" if hasattr(cls, "encode") else "not an autoencoder"
        raise ValueError(f"{config_file.parent}: {name} is {what}; known: {', '.join(VAES)}")
    vae = diffusers.AutoModel.from_pretrained(
        str(folder), subfolder=subfolder, torch_dtype=dtype, local_files_only=True
    )
    vae = vae.to(device).eval().requires_grad_(False)
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    try:
        space = _space(vae, name, folder, subfolder)
    except ValueError as error:
        raise ValueError(f"{config_file.parent}: {error}") from None
    return vae, space


@torch.no_grad()
def encode(vae: nn.Module, space: LatentSpace, pixels: torch.Tensor, batch_frames: int = 16) -> torch.Tensor:
    """Pixels `[T, C, H, W]` in [-1, 1] -> unscaled latents `[T', c, h, w]` (the posterior's mode), float32
    on the pixels' device. An image VAE encodes `batch_frames` frames per call; a causal video VAE the
    whole clip at once, after `space.latent_shape` has checked that it encodes every frame and pixel."""
    frames, _, height, width = pixels.shape
    expected = space.latent_shape(frames, height, width)  # (T', h, w)
    x = pixels.to(vae.device, vae.dtype)
    if space.causal:
        clip = x.permute(1, 0, 2, 3)[None]  # [1, C, T, H, W]
        latents = vae.encode(clip).latent_dist.mode()[0].permute(1, 0, 2, 3)  # [T', c, h, w]
    else:
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in x.split(batch_frames)])
    made = (len(latents), *latents.shape[2:])
    if made != expected:
        raise ValueError(f"{space.vae_class} made latents {made} of {tuple(pixels.shape)}, not {expected}")
    return latents.float().to(pixels.device)


@torch.no_grad()
def decode(vae: nn.Module, space: LatentSpace, latents: torch.Tensor, chunk_frames: int = 16) -> torch.Tensor:
    """Normalized latents `[T', c, h, w]` -> pixels `[T, C, H, W]` in [-1, 1], T = `space.pixel_frames(T')`,
    float32 on the latents' device.

    An image VAE decodes `chunk_frames` frames per call, each chunk moved to the latents' device, so the
    VAE's device holds one chunk. A causal video VAE decodes the clip in one call, which is exact (no
    chunk seams) and bounded anyway: diffusers' Wan `_decode` runs its decoder one latent frame at a time
    with a cache of each causal convolution's last frames, and CogVideoX two at a time with its conv
    cache, so activations do not grow with length; the decoded video does (Wan concatenates it on the
    VAE's device: about twice the video at the end). LTX decodes all frames in one pass, so its
    activations do grow with length.
    """
    z = space.denormalize(latents.to(vae.device, torch.float32)).to(vae.dtype)
    if space.causal:
        # LTX 0.9.1+ conditions its decoder on a timestep; its pipeline decodes clean latents at 0.
        timestep = [torch.zeros(1, device=vae.device, dtype=vae.dtype)]
        extra = timestep if vae.config.get("timestep_conditioning") else []
        video = vae.decode(z.permute(1, 0, 2, 3)[None], *extra).sample[0].permute(1, 0, 2, 3)  # [T, C, H, W]
        video = video.float().to(latents.device)
    else:
        chunks = [vae.decode(chunk).sample.float().to(latents.device) for chunk in z.split(chunk_frames)]
        video = torch.cat(chunks)
    expected = space.pixel_frames(len(latents))
    if len(video) != expected:  # CogVideoX decodes an even number n of latents to 4n frames
        raise ValueError(
            f"{space.vae_class} decoded {len(latents)} latents to {len(video)} frames, not {expected}"
        )
    return video.clamp(-1, 1)


@dataclass
class Decoder:
    """Latents of one space -> pixels, for everything people look at (rollouts, samples, scores)."""

    vae: nn.Module
    space: LatentSpace
    chunk_frames: int = 16

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [T', c, h, w] -> frames [T, C, H, W] in [-1, 1]."""
        return decode(self.vae, self.space, latents, self.chunk_frames)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frames [T, C, H, W] in [-1, 1] -> normalized latents [T', c, h, w], as the loader gives them."""
        return self.space.normalize(encode(self.vae, self.space, pixels))


def load_decoder(
    space: LatentSpace, device: str | torch.device = "cpu", folder: str | Path | None = None
) -> Decoder:
    """The VAE that decodes `space`'s latents: from `folder` (default: where `space` says it was loaded
    from, with its subfolder), refused if it is not the same autoencoder."""
    where = Path(folder) if folder is not None else Path(space.path)
    subfolder = space.subfolder if folder is None or (where / (space.subfolder or "")).is_dir() else None
    try:
        vae, found = load_vae(where, subfolder, device)
    except ValueError as error:
        raise ValueError(
            f"the latents' VAE ({space.vae_class}) is not where it was looked for: {error}; pass its folder "
            "(--vae DIR)"
        ) from None
    if difference := space.mismatch(found):
        raise ValueError(f"{where}: not the VAE of these latents: {difference}")
    return Decoder(vae, space)
