import dataclasses
import json

import pytest
import torch

from dforce.data.latents import LatentSpace, hash_config

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [2.0, 0.5, 4.0, 1.0]


def space(**changes) -> LatentSpace:
    """A Wan-like space: causal, 4x in time, 8x in space, per-channel statistics and no scaling factor."""
    fields = dict(
        vae_class="AutoencoderKLWan", config_hash="ab" * 32, path="/vae", subfolder=None,
        temporal_compression=4, spatial_compression=8, causal=True, channels=4,
        latents_mean=MEAN, latents_std=STD,
    )  # fmt: skip
    return LatentSpace(**{**fields, **changes})


def test_normalisation_is_what_the_diffusers_pipelines_undo():
    x = torch.randn(3, 2, 4, 5, 6, generator=torch.Generator().manual_seed(0))  # [B, T, C, h, w]
    mean, std = torch.tensor(MEAN).view(4, 1, 1), torch.tensor(STD).view(4, 1, 1)
    wan = space()
    # diffusers' Wan pipeline decodes `latents / (1 / std) + mean`; the SDXL and LTX ones
    # `latents * std / scaling_factor + mean`; SD and Flux `latents / scaling_factor + shift`.
    assert torch.allclose(wan.normalize(x) / (1 / std) + mean, x, atol=1e-6)
    scaled = space(scaling_factor=0.5)
    assert torch.allclose(scaled.normalize(x) * std / 0.5 + mean, x, atol=1e-6)
    flux = space(latents_mean=None, latents_std=None, scaling_factor=0.3611, shift_factor=0.1159)
    assert torch.allclose(flux.normalize(x), (x - 0.1159) * 0.3611)
    for each in (wan, scaled, flux, space(latents_mean=None, latents_std=None)):
        assert torch.allclose(each.denormalize(each.normalize(x)), x, atol=1e-6)
    half = x.to(torch.bfloat16)
    assert wan.normalize(half).dtype == torch.bfloat16


def test_frame_bookkeeping():
    causal = space()
    assert [causal.pixel_frames(n) for n in (1, 2, 9)] == [1, 5, 33]
    assert all(causal.latent_frames(causal.pixel_frames(n)) == n for n in range(1, 12))
    with pytest.raises(
        ValueError, match=r"^AutoencoderKLWan encodes 1 \+ 4k frames; 32 is not one: use 29 or 33$"
    ):
        causal.latent_frames(32)
    with pytest.raises(ValueError, match="0 is not one: use 1 or 5"):
        causal.latent_frames(0)
    image = space(vae_class="AutoencoderKL", temporal_compression=1, causal=False)
    assert image.latent_frames(7) == image.pixel_frames(7) == 7
    pairs = space(temporal_compression=2, causal=False)  # non-causal: latent i is frames 2i, 2i + 1
    assert pairs.pixel_frames(3) == 6 and pairs.latent_frames(6) == 3
    with pytest.raises(ValueError, match="encodes 2k frames; 5 is not one: use 4 or 6"):
        pairs.latent_frames(5)
    with pytest.raises(ValueError, match=r"1 is not one: use 2$"):
        pairs.latent_frames(1)
    assert causal.latent_shape(9, 64, 96) == (3, 8, 12)
    with pytest.raises(ValueError, match="sides divisible by 8, got 64x100"):
        causal.latent_shape(9, 64, 100)


def test_records_round_trip_and_old_ones_are_refused():
    wan = space(subfolder="vae", scaling_factor=None)
    assert LatentSpace.from_dict(json.loads(json.dumps(wan.to_dict()))) == wan
    record = {**wan.to_dict(), "pixel_frames": 33, "latent_frames": 9}  # extra keys of a shard record
    assert LatentSpace.from_dict(record) == wan
    old = {"autoencoder": "AutoencoderKL", "path": "/vae", "scaling_factor": 0.18215, "frames": 8}
    with pytest.raises(ValueError, match="lacks vae_class, config_hash, subfolder, temporal_compression"):
        LatentSpace.from_dict(old)


def test_mismatch_names_what_differs():
    wan = space()
    assert wan.mismatch(space(path="/elsewhere", subfolder="vae")) is None  # a copy of the same VAE
    other = space(vae_class="AutoencoderKLCogVideoX", config_hash="cd" * 32)
    assert wan.mismatch(other).startswith(
        "vae_class 'AutoencoderKLWan' vs 'AutoencoderKLCogVideoX'; config_hash"
    )
    assert wan.mismatch(space(latents_std=[2.0, 0.5, 4.0, 2.0])).startswith(
        "latents_std [2.0, 0.5, 4.0, 1.0] vs"
    )


def test_bad_spaces_are_refused():
    for changes, message in [
        ({"latents_std": None}, "come together"),
        ({"latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}, "16/16 entries for 4 channels"),
        ({"latents_std": [1.0, 0.0, 1.0, 1.0]}, "must be positive"),
        ({"shift_factor": 0.1}, "give one"),
        ({"scaling_factor": 0.0}, "must not be 0"),
        ({"temporal_compression": 0}, ">= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            space(**changes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        space().channels = 8


def test_config_hash_ignores_order_and_private_keys():
    config = {"z_dim": 16, "dim_mult": [1, 2, 4], "_name_or_path": "/a", "_diffusers_version": "0.35"}
    same = {"_name_or_path": "/b", "dim_mult": (1, 2, 4), "z_dim": 16}
    assert hash_config(config) == hash_config(same) != hash_config({**same, "z_dim": 48})
    assert len(hash_config(config)) == 64
