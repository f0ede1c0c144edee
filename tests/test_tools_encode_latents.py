import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan

from dforce.clips import DataConfig, resize_crop
from dforce.data import make_loader
from dforce.decode import decode_video
from dforce.reading import read_samples

spec = importlib.util.spec_from_file_location(
    "encode_latents", Path(__file__).parent.parent / "tools/encode_latents.py"
)
encode_latents = importlib.util.module_from_spec(spec)
spec.loader.exec_module(encode_latents)


def tiny_kl(path: Path) -> Path:
    torch.manual_seed(0)
    blocks = dict(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
    vae = AutoencoderKL(
        **blocks, block_out_channels=[8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=4
    )
    vae.save_pretrained(path)
    return path


def tiny_wan(path: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[2.0, 2.0, 4.0, 4.0],
    )  # fmt: skip
    vae.save_pretrained(path)
    return path


def test_image_autoencoder_latents_round_trip(index_shards, tmp_path, capsys):
    vae_path = tiny_kl(tmp_path / "vae")
    shards = "::".join(index_shards[:2])  # 6 clips of 8 frames, 8x32
    encode_latents.main([shards, "--vae", str(vae_path), "--out", str(tmp_path / "latents"), "--size", "16"])
    assert "6 videos read, 6 samples written to 1 shards, 0 skipped" in capsys.readouterr().out
    samples = list(read_samples(str(tmp_path / "latents/train-*.tar")))
    record = json.loads(samples[0]["json"])
    assert (
        record["latent"]["autoencoder"] == "AutoencoderKL" and record["latent"]["scaling_factor"] == 0.18215
    )
    assert record["latent"]["shape"] == [8, 4, 8, 8] and len(record["actions"]) == 8

    config = DataConfig(str(tmp_path / "latents/train-*.tar"), clip_frames=4, clip_start=1)
    batch = next(iter(make_loader(config, batch_size=3)))
    assert batch["latent"] and batch["video"].shape == (3, 4, 4, 8, 8)
    assert batch["actions"][:, :, 0].tolist() == [[1, 2, 3, 4]] * 3
    # The loader's clip equals the autoencoder's scaled posterior mean of the same frames.
    (source,) = [s for s in read_samples(shards) if s["__key__"] == batch["key"][0]]
    vae = encode_latents.load_autoencoder(vae_path)
    pixels = resize_crop(decode_video(source["mp4"]), 16).float()  # [T, C, 16, 16]
    expected = vae.encode(pixels[1:5] / 127.5 - 1).latent_dist.mode() * 0.18215
    assert torch.allclose(batch["video"][0], expected, atol=2e-2 * expected.abs().max().item())


def test_video_autoencoder_compresses_time(tmp_path, index_shards):
    vae_path = tiny_wan(tmp_path / "vae")
    summary = encode_latents.encode_latents(index_shards[0], tmp_path / "latents", vae_path)
    assert summary.samples == 3 and not summary.skipped
    (sample, *_) = read_samples(summary.shards)
    record = json.loads(sample["json"])
    latent = np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False)
    assert latent.shape == (3, 4, 4, 16) and latent.dtype == np.float16  # 8 frames -> 3, 8x32 -> 4x16
    assert "actions" not in record and record["latent"]["latents_std"] == [2.0, 2.0, 4.0, 4.0]
    batch = next(iter(make_loader(DataConfig(summary.shards, clip_frames=3, shuffle=False), batch_size=1)))
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(-1, 1, 1), torch.tensor([2.0, 2, 4, 4]).view(-1, 1, 1)
    assert torch.allclose(batch["video"][0], (torch.from_numpy(latent).float() - mean) / std)


def test_errors(tmp_path, index_shards):
    with pytest.raises(SystemExit, match=r"encode_latents: no config\.json in"):
        encode_latents.main([index_shards[0], "--vae", str(tmp_path), "--out", str(tmp_path / "out")])
