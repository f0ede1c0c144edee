"""Tiny random autoencoders of each known class, saved with save_pretrained and loaded back through
`dforce.data.vae.load_vae` (nothing is downloaded)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLLTXVideo, AutoencoderKLWan

from dforce.data.latents import hash_config
from dforce.data.vae import decode, encode, load_vae

MEAN, STD = [0.1, 0.2, 0.3, 0.4], [2.0, 2.0, 4.0, 4.0]


def tiny_kl() -> AutoencoderKL:
    """2x spatial compression, 4 latent channels, scaling factor 0.18215."""
    torch.manual_seed(0)
    blocks = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    return AutoencoderKL(
        **blocks, block_out_channels=[8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=4
    )


def tiny_wan(**changes) -> AutoencoderKLWan:
    """Wan 2.1's layout at toy width: 4x in time (1 + 4k frames -> 1 + k latents), 4x in space."""
    torch.manual_seed(0)
    options = dict(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True]
    )
    return AutoencoderKLWan(**{**options, "latents_mean": MEAN, "latents_std": STD, **changes})


def tiny_cogvideox() -> AutoencoderKLCogVideoX:
    torch.manual_seed(0)
    blocks = dict(down_block_types=["CogVideoXDownBlock3D"] * 3, up_block_types=["CogVideoXUpBlock3D"] * 3)
    return AutoencoderKLCogVideoX(
        **blocks, block_out_channels=[8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=4
    )


def tiny_ltx() -> AutoencoderKLLTXVideo:
    """2x in time, 4x in space (patch 2, one down block); its decoder takes a timestep (LTX 0.9.1+)."""
    torch.manual_seed(0)
    return AutoencoderKLLTXVideo(
        block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        down_block_types=("LTXVideoDownBlock3D",) * 2,
        layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), spatio_temporal_scaling=(True, False),
        decoder_spatio_temporal_scaling=(True, False), decoder_inject_noise=(False, False, False),
        upsample_residual=(False, False), upsample_factor=(1, 1), latent_channels=4, patch_size=2,
        timestep_conditioning=True,
    )  # fmt: skip


def save(vae: torch.nn.Module, path: Path) -> Path:
    vae.save_pretrained(path)
    return path


def pixels(frames: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(frames, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(
    "build, expected",
    [
        (tiny_kl, dict(temporal_compression=1, spatial_compression=2, causal=False, scaling_factor=0.18215)),
        (tiny_wan, dict(temporal_compression=4, spatial_compression=4, causal=True, latents_std=STD)),
        (
            tiny_cogvideox,
            dict(temporal_compression=4, spatial_compression=4, causal=True, scaling_factor=1.15258426),
        ),
        (tiny_ltx, dict(temporal_compression=2, spatial_compression=4, causal=True, latents_std=[1.0] * 4)),
    ],
    ids=["kl", "wan", "cogvideox", "ltx"],
)
def test_each_class_encodes_and_decodes_as_its_space_says(tmp_path, build, expected):
    original = build()
    save(original, tmp_path / "pipeline/vae")
    vae, space = load_vae(tmp_path / "pipeline", subfolder="vae")
    assert space.vae_class == type(original).__name__ and space.channels == 4
    assert {key: getattr(space, key) for key in expected} == expected
    assert space.path == str((tmp_path / "pipeline").resolve()) and space.subfolder == "vae"
    assert space.config_hash == hash_config(original.config)

    video = pixels(space.pixel_frames(3))  # [T, 3, 16, 16]: 3 latent frames
    latents = encode(vae, space, video, batch_frames=2)
    side = 16 // space.spatial_compression
    assert latents.shape == (3, 4, side, side) and latents.dtype == torch.float32
    decoded = decode(vae, space, space.normalize(latents), chunk_frames=2)
    assert decoded.shape == video.shape and decoded.abs().max() <= 1
    if not space.causal:  # frames are encoded and decoded alone: chunking changes nothing
        assert torch.allclose(latents, encode(vae, space, video, batch_frames=16), atol=1e-5)
        assert torch.allclose(decoded, decode(vae, space, space.normalize(latents)), atol=1e-5)
    elif (
        space.vae_class != "AutoencoderKLCogVideoX"
    ):  # its group norms mix frames, so latent 0 sees later ones
        # Latent 0 is pixel frame 0 alone, and latents 0..1 the first 1 + r frames alone.
        r = space.temporal_compression
        assert torch.allclose(encode(vae, space, video[:1]), latents[:1], atol=1e-5)
        assert torch.allclose(encode(vae, space, video[: 1 + r]), latents[:2], atol=1e-5)


def test_lengths_and_sizes_a_vae_cannot_encode_exactly(tmp_path):
    vae, space = load_vae(save(tiny_wan(), tmp_path / "wan"))
    with pytest.raises(
        ValueError, match=r"AutoencoderKLWan encodes 1 \+ 4k frames; 8 is not one: use 5 or 9"
    ):
        encode(vae, space, pixels(8))
    with pytest.raises(ValueError, match="divisible by 4, got 18x18"):
        encode(vae, space, pixels(9, size=18))
    cog, cog_space = load_vae(save(tiny_cogvideox(), tmp_path / "cog"))
    latents = encode(cog, cog_space, pixels(5))  # [2, 4, 4, 4]
    with pytest.raises(ValueError, match="decoded 2 latents to 8 frames, not 5"):  # its decoder pairs latents
        decode(cog, cog_space, cog_space.normalize(latents))


def test_loading_options_and_errors(tmp_path):
    vae, _ = load_vae(save(tiny_kl(), tmp_path / "kl"), tiling=True, slicing=True)
    assert vae.use_tiling and vae.use_slicing and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())

    with pytest.raises(ValueError, match=f"no VAE folder {tmp_path / 'missing'}"):
        load_vae(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"no config.json in {tmp_path}: expected .* by save_pretrained$"):
        load_vae(tmp_path)
    save(tiny_kl(), tmp_path / "pipeline/vae")
    with pytest.raises(ValueError, match=r"a pipeline folder\? its VAE is in subfolder vae"):
        load_vae(tmp_path / "pipeline")
    for name, message in [
        ("UNet2DModel", "not an autoencoder"),
        ("AutoencoderTiny", "an autoencoder dforce does not know"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(
            ValueError, match=f"{tmp_path / name}: {name} is {message}; known: AutoencoderKL, "
        ):
            load_vae(tmp_path / name)
    with pytest.raises(
        ValueError, match="temporal compression 2: diffusers encodes its frames in chunks of 4"
    ):
        load_vae(save(tiny_wan(temperal_downsample=[False, True]), tmp_path / "wan2x"))
