"""What latents mean: the autoencoder that made them, how time and space are compressed, and how they
are normalised for training (`LatentSpace`).

A latent shard's json record holds it under `latent`, so a loader, a trained model and a decoder agree
on one autoencoder without loading it. Only torch: the autoencoder itself is `dforce.data.vae`'s business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_FILE = "vae.json"  # beside a latent model's weights

# The fields that say whether two spaces hold interchangeable latents (not where the VAE was loaded from).
_SAME = (
    "vae_class",
    "config_hash",
    "temporal_compression",
    "spatial_compression",
    "causal",
    "channels",
    "scaling_factor",
    "shift_factor",
    "latents_mean",
    "latents_std",
)


def hash_config(config: Mapping) -> str:
    """sha256 hex of an autoencoder config as canonical JSON, without the `_`-keys (path, version) that
    change when the same weights are copied or re-saved."""
    public = {key: value for key, value in config.items() if not key.startswith("_")}
    text = json.dumps(public, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class LatentSpace:
    """The autoencoder behind a set of latents and what one latent frame stands for.

    `temporal_compression` r: pixel frames per latent frame (1 for image VAEs). `causal`: latent 0 stands
    for pixel frame 0 alone and every later one for r frames (Wan, CogVideoX, LTX), so n latents are
    1 + r(n - 1) frames. The normalisation is the one diffusers' pipelines apply:
    `(x - mean) * scale / std` with per-channel statistics (Wan: no scaling factor, so scale 1), else
    `(x - shift) * scale`.
    """

    vae_class: str
    config_hash: str  # `hash_config` of the VAE's config
    path: str  # absolute folder it was loaded from
    subfolder: str | None
    temporal_compression: int
    spatial_compression: int
    causal: bool
    channels: int
    scaling_factor: float | None = None
    shift_factor: float | None = None
    latents_mean: list[float] | None = None
    latents_std: list[float] | None = None

    def __post_init__(self) -> None:
        if min(self.temporal_compression, self.spatial_compression, self.channels) < 1:
            raise ValueError(
                "temporal_compression, spatial_compression and channels must be >= 1, got "
                f"{self.temporal_compression}, {self.spatial_compression}, {self.channels}"
            )
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std come together")
        if self.latents_mean is not None:
            if not len(self.latents_mean) == len(self.latents_std) == self.channels:
                raise ValueError(
                    f"latents_mean/std have {len(self.latents_mean)}/{len(self.latents_std)} entries "
                    f"for {self.channels} channels"
                )
            if min(self.latents_std) <= 0:
                raise ValueError("latents_std must be positive")
            if self.shift_factor is not None:
                raise ValueError("shift_factor and latents_mean both shift the latents: give one")
        if self.scaling_factor == 0:
            raise ValueError("scaling_factor must not be 0")

    def _affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, factor) with `normalize(x) = (x - offset) * factor`, broadcasting over [..., C, h, w]."""
        scale = 1.0 if self.scaling_factor is None else self.scaling_factor
        if self.latents_mean is None:
            offset = torch.tensor(self.shift_factor or 0.0)
            factor = torch.tensor(scale)
        else:
            offset = torch.tensor(self.latents_mean).view(-1, 1, 1)  # [C, 1, 1]
            factor = scale / torch.tensor(self.latents_std).view(-1, 1, 1)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return offset.to(like.device, dtype), factor.to(like.device, dtype)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled VAE latents `[..., C, h, w]` -> what the model trains on."""
        offset, factor = self._affine(latents)
        return (latents - offset) * factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalize`: model latents -> what the VAE's decoder takes."""
        offset, factor = self._affine(latents)
        return latents / factor + offset

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames that `latent_frames` latents stand for."""
        if latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {latent_frames}")
        r = self.temporal_compression
        return 1 + r * (latent_frames - 1) if self.causal else latent_frames * r

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of `pixel_frames` frames; ValueError naming the nearest lengths the VAE encodes
        exactly when it cannot (a causal video VAE would drop the frames left over)."""
        r = self.temporal_compression
        if self.causal:
            below = 1 + (max(pixel_frames, 1) - 1) // r * r
            if pixel_frames >= 1 and pixel_frames == below:
                return 1 + (pixel_frames - 1) // r
            form, nearest = f"1 + {r}k", [n for n in (below, below + r) if n >= 1]
        else:
            if pixel_frames >= r and pixel_frames % r == 0:
                return pixel_frames // r
            below = pixel_frames // r * r
            form, nearest = f"{r}k", [n for n in (below, below + r) if n >= r]
        suggestion = " or ".join(map(str, dict.fromkeys(nearest)))
        raise ValueError(
            f"{self.vae_class} encodes {form} frames; {pixel_frames} is not one: use {suggestion}"
        )

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames, height, width) of the latents of pixels that size; ValueError if the VAE cannot encode
        them exactly."""
        side = self.spatial_compression
        if height % side or width % side:
            raise ValueError(f"{self.vae_class} encodes sides divisible by {side}, got {height}x{width}")
        return self.latent_frames(frames), height // side, width // side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> LatentSpace:
        """The space of a `to_dict` (other keys are ignored); ValueError naming the missing keys."""
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"the latent space lacks {', '.join(missing)}")
        return cls(**{name: data[name] for name in names})

    def save(self, directory: str | Path) -> Path:
        """`vae.json` in a model directory: what its latents mean, and where the VAE that decodes them is."""
        path = Path(directory) / MODEL_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def of_model(cls, directory: str | Path) -> LatentSpace | None:
        """The space of a model directory's latents (its `vae.json`), or None for a pixel model."""
        path = Path(directory) / MODEL_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from None

    def mismatch(self, other: LatentSpace) -> str | None:
        """What makes `other`'s latents differ from these (None if nothing: the folder may differ)."""
        differences = [
            f"{name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in _SAME
            if getattr(self, name) != getattr(other, name)
        ]
        return "; ".join(differences) or None


def latents_within(space: LatentSpace, pixel_frames: int) -> int:
    """The most latent frames whose pixel frames fit in `pixel_frames` (0 if none do)."""
    n = 0
    while space.pixel_frames(n + 1) <= pixel_frames:
        n += 1
    return n
