"""`dforce encode-latents` (and `tools/encode_latents.py`) on real-format shards with tiny random VAEs,
and the loader's latent clips: where they start and how they are normalised."""

import io
import json
import re
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import pattern, write_index_shards
from test_vae import MEAN, STD, save, tiny_kl, tiny_wan

from dforce.cli import main
from dforce.data.clips import DataConfig, resize_crop
from dforce.data.decode import decode_video
from dforce.data.encode_latents import encode_latents
from dforce.data.loader import make_loader, probe_shards, to_float
from dforce.data.reading import read_samples
from dforce.data.shards import ShardSink, encode_video
from dforce.data.vae import load_vae

TOOL = Path(__file__).parent.parent / "tools/encode_latents.py"


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> SimpleNamespace:
    """A Wan VAE in a pipeline folder's `vae/`, 9-frame 8x32 videos (1 + 4 * 2: 3 latents of 2x8), and
    their latents written by the CLI with --keep-video."""
    root = tmp_path_factory.mktemp("wan")
    save(tiny_wan(), root / "pipeline/vae")
    videos = write_index_shards(root / "videos", shards=2, per_shard=2, frames=9)
    out = root / "latents"
    options = ["--subfolder", "vae", "--out", str(out), "--keep-video", "--batch-frames", "4"]
    main(["encode-latents", "::".join(videos), "--vae", str(root / "pipeline"), *options])
    return SimpleNamespace(root=root, videos=videos, latents=sorted(map(str, out.glob("train-*.tar"))))


def test_image_vae_latents_through_the_tool(index_shards, tmp_path, monkeypatch, capsys):
    vae_path = save(tiny_kl(), tmp_path / "vae")
    shards = "::".join(index_shards[:2])  # 6 clips of 8 frames, 8x32
    argv = [str(TOOL), shards, "--vae", str(vae_path), "--out", str(tmp_path / "latents"), "--size", "16"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(TOOL), run_name="__main__")
    assert "6 videos read, 6 samples written to 1 shards, 0 skipped" in capsys.readouterr().out
    (sample, *_) = read_samples(str(tmp_path / "latents/train-*.tar"))
    record = json.loads(sample["json"])
    assert record["latent"]["vae_class"] == "AutoencoderKL" and record["latent"]["scaling_factor"] == 0.18215
    assert record["latent"]["pixel_frames"] == record["latent"]["latent_frames"] == 8
    assert len(record["actions"]) == 8  # no temporal compression: per-frame fields stay

    config = DataConfig(str(tmp_path / "latents/train-*.tar"), clip_frames=4, clip_start=1, num_workers=0)
    batch = next(iter(make_loader(config, batch_size=3)))
    assert batch["latent"] and batch["video"].shape == (3, 4, 4, 8, 8)
    assert batch["actions"][:, :, 0].tolist() == [[1, 2, 3, 4]] * 3
    # The loader's clip is the VAE's posterior mode of the same frames, scaled as Stable Diffusion does.
    (source,) = [s for s in read_samples(shards) if s["__key__"] == batch["key"][0]]
    vae, _ = load_vae(vae_path)
    pixels = to_float(resize_crop(decode_video(source["mp4"]), 16))  # [8, 3, 16, 16]
    expected = vae.encode(pixels[1:5]).latent_dist.mode() * 0.18215
    assert torch.allclose(batch["video"][0], expected, atol=2e-3 * expected.abs().max().item())


def test_causal_latents_count_frames_and_start_at_latent_0(wan):
    samples = list(read_samples(wan.latents))
    assert len(samples) == 4
    sources = {s["__key__"]: s for s in read_samples(wan.videos)}
    record = json.loads(samples[0]["json"])
    assert record["latent"]["pixel_frames"] == 9 and record["latent"]["latent_frames"] == 3
    assert record["latent"]["vae_class"] == "AutoencoderKLWan" and record["latent"]["subfolder"] == "vae"
    assert "actions" not in record and record["label"] == 0  # per-frame rows no longer match the latents
    assert len(record["pixel_fields"]["actions"]) == 9  # but are kept per pixel frame, for scoring
    assert samples[0]["mp4"] == sources[samples[0]["__key__"]]["mp4"]  # --keep-video
    latent = np.load(io.BytesIO(samples[0]["latent.npy"]), allow_pickle=False)
    assert latent.shape == (3, 4, 2, 8) and latent.dtype == np.float16

    vae, space = load_vae(wan.root / "pipeline", subfolder="vae")
    assert probe_shards(DataConfig(wan.latents)).mismatch(space) is None
    pixels = to_float(decode_video(sources[samples[0]["__key__"]]["mp4"]))  # [9, 3, 8, 32]
    by_hand = vae.encode(pixels.permute(1, 0, 2, 3)[None]).latent_dist.mode()[0].permute(1, 0, 2, 3)
    assert torch.allclose(torch.from_numpy(latent).float(), by_hand, atol=2e-3)

    stored = {s["__key__"]: torch.from_numpy(np.load(io.BytesIO(s["latent.npy"]))).float() for s in samples}
    mean, std = torch.tensor(MEAN).view(4, 1, 1), torch.tensor(STD).view(4, 1, 1)
    config = DataConfig(wan.latents, clip_frames=2, num_workers=0, shuffle_buffer=4)
    for epoch in range(3):  # random starts would differ between epochs; causal clips never move
        for batch in make_loader(config, batch_size=2, epoch=epoch):
            for key, clip in zip(batch["key"], batch["video"], strict=True):
                # diffusers' Wan pipeline decodes `latents / (1 / std) + mean`: the inverse of this
                assert torch.allclose(clip, (stored[key][:2] - mean) * (1 / std), atol=1e-6)


def test_options_latents_cannot_follow_are_errors(wan):
    for options, message in [
        ({"clip_start": 1}, "causal .* clips start at latent 0 with frame_stride 1, got clip_start 1"),
        ({"frame_stride": 2}, "got clip_start None and frame_stride 2"),
        ({"size": 16}, "data.size is 16, but latents keep the size they were encoded at"),
        ({"fps": 8.0}, "data.fps is 8.0, but latents keep the fps"),
    ]:
        config = DataConfig(wan.latents, clip_frames=2, num_workers=0, **options)
        with pytest.raises(ValueError, match=message):
            probe_shards(config)
        with pytest.raises(ValueError, match=message):  # the loader's check, for callers that skip the probe
            next(iter(make_loader(config, batch_size=2)))


def test_probe_shards_refuses_mixtures(wan, index_shards, tmp_path):
    assert probe_shards(DataConfig(index_shards)) is None
    mixed = rf"shards mix videos \({index_shards[0]}\) and latents \({wan.latents[0]}\)$"
    with pytest.raises(ValueError, match=mixed):
        probe_shards(DataConfig([index_shards[0], *wan.latents]))
    kl = encode_latents(index_shards[0], tmp_path / "kl", save(tiny_kl(), tmp_path / "vae"))
    two = f"{wan.latents[0]} and {kl.shards[0]} hold latents of different autoencoders: vae_class 'Autoenc"
    with pytest.raises(ValueError, match=two):
        probe_shards(DataConfig([wan.latents[0], *kl.shards]))
    (sample, *_) = read_samples(wan.latents)
    old = {"autoencoder": "AutoencoderKLWan", "latents_mean": MEAN, "latents_std": STD, "frames": 9}
    with ShardSink(tmp_path / "old") as sink:
        sink.write({"__key__": "a", "latent.npy": sample["latent.npy"], "json": {"latent": old}})
    with pytest.raises(ValueError, match=r"lacks vae_class, .*: re-encode the shards with dforce encode-"):
        probe_shards(DataConfig(sink.shards))


def test_lengths_a_causal_vae_cannot_encode(wan, index_shards, tmp_path):
    pipeline = str(wan.root / "pipeline")
    vae = ["--vae", pipeline, "--subfolder", "vae"]
    refusal = "AutoencoderKLWan encodes 1 + 4k frames; 8 is not one: use 5 or 9"
    whole = re.escape(f"dforce encode-latents: {index_shards[0]}#s00000: {refusal}")
    with pytest.raises(SystemExit, match=f"^{whole}$"):
        main(["encode-latents", index_shards[0], *vae, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with ShardSink(tmp_path / "videos") as sink:  # the first length fixes the check; later ones are skipped
        for key, frames in [("a", 9), ("b", 8), ("c", 13)]:
            sink.write({"__key__": key, "mp4": encode_video(pattern(frames, 8, 32), fps=8), "json": {}})
    summary = encode_latents(sink.shards, tmp_path / "latents", pipeline, subfolder="vae")
    assert summary.samples == 2 and summary.skipped == [(f"{sink.shards[0]}#b", refusal)]
    assert [json.loads(s["json"])["latent"]["latent_frames"] for s in read_samples(summary.shards)] == [3, 4]


def test_a_missing_vae_is_named(index_shards, tmp_path):
    with pytest.raises(SystemExit, match=f"^dforce encode-latents: no VAE folder {tmp_path / 'nowhere'}$"):
        main(["encode-latents", index_shards[0], "--vae", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_encode_latents_that_writes_nothing_fails(wan, tmp_path, capsys):
    """Shards with no samples (a text file) or none that decodes: a one-line error naming the shards, after
    the summary; the normal run (the `wan` fixture's) returns, exit status 0."""
    vae = ["--vae", str(wan.root / "pipeline"), "--subfolder", "vae", "--out", str(tmp_path / "latents")]
    text = tmp_path / "notes.txt"
    text.write_text("not a shard\n")
    with ShardSink(tmp_path / "records") as sink:
        for key in "ab":
            sink.write({"__key__": key, "json": {"caption": "no video"}})
    cases = [
        (str(text), f"no samples in {text} (webdataset .tar shards of videos)"),
        (sink.shards[0], f"all 2 samples read from {sink.shards[0]} were skipped (no video in fields"),
    ]
    for shards, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(["encode-latents", shards, *vae])
        assert str(exit.value).startswith(f"dforce encode-latents: nothing written: {message}")
        assert "\n" not in str(exit.value) and "0 samples written" in capsys.readouterr().out
    assert not (tmp_path / "latents").exists()
    assert main(["encode-latents", wan.videos[0], *vae]) is None  # no SystemExit: status 0
    assert "2 videos read, 2 samples written to 1 shards, 0 skipped" in capsys.readouterr().out
