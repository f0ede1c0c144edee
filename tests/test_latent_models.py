"""Latent video end to end with tiny random VAEs (an image `AutoencoderKL`, a causal `AutoencoderKLWan`):
bouncing-balls shards encoded by `dforce encode-latents`, a few training steps whose validation writes
decoded rollouts, a model directory that knows its VAE, `dforce sample` and `dforce eval` in pixels,
and each bad input's error."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import reset_accelerate
from test_vae import save, tiny_kl, tiny_wan

from dforce.cli import main
from dforce.data.latents import LatentSpace
from dforce.data.synthetic import write_bouncing_balls
from dforce.data.video import read_clip
from dforce.evaluation.ablate import ablate
from dforce.training.config import ConfigError, load_config
from dforce.training.train import train

# kind -> (VAE, subfolder, pixel frames of a training clip / a held-out clip, latent side at 16x16)
KINDS = {"kl": (tiny_kl, None, 4, 5, 8), "wan": (tiny_wan, "vae", 9, 17, 4)}

CONFIG = """\
output_dir: {out}
seed: 0
train: {{max_steps: 2, checkpoint_every: 2, batch_size: 2, log_every: 1, lr: 1e-3, trackers: []}}
data: {{shards: "{latents}/train-*.tar", clip_frames: {clip}, num_workers: 0, shuffle_buffer: 4}}
noise: {{levels: 20}}
model: {{in_channels: 4, sample_size: {side}, patch_size: 2, num_layers: 1, num_attention_heads: 2,
        attention_head_dim: 8}}
validation: {{shards: "{latents}/val-*.tar", every: 2, batches: 1, context_frames: 1, rollout_frames: 4,
             rollout_clips: 1, sampling_steps: 2}}
"""


@pytest.fixture(scope="module", params=sorted(KINDS))
def run(request, tmp_path_factory) -> SimpleNamespace:
    """Pixel shards, their latents (the held-out ones with their videos kept), and a trained model."""
    kind = request.param
    make_vae, subfolder, train_frames, val_frames, side = KINDS[kind]
    root = tmp_path_factory.mktemp(kind)
    vae_dir = save(make_vae(), root / "pipeline" / (subfolder or ""))
    videos, latents = root / "videos", root / "latents"
    write_bouncing_balls(videos, num_clips=4, frames=train_frames, size=16, num_balls=1, seed=0)
    write_bouncing_balls(videos, num_clips=2, frames=val_frames, size=16, num_balls=1, seed=1, prefix="val")
    vae_args = ["--vae", str(root / "pipeline"), *(["--subfolder", subfolder] if subfolder else [])]
    for prefix, extra in (("train", []), ("val", ["--keep-video"])):
        shards = str(videos / f"{prefix}-000000.tar")
        main(["encode-latents", shards, *vae_args, "--out", str(latents), "--prefix", prefix, *extra])
    clip = 3 if kind == "wan" else 4  # latent frames: Wan's 3 stand for 9 pixel frames
    config_file = root / "run.yaml"
    config_file.write_text(CONFIG.format(out=root / "run", latents=latents, clip=clip, side=side))
    train(load_config(config_file))
    reset_accelerate()
    return SimpleNamespace(
        kind=kind, root=root, vae_dir=vae_dir, videos=videos, latents=latents, config=config_file
    )


def test_training_exports_the_vae_and_writes_decoded_rollouts(run):
    space = LatentSpace.of_model(run.root / "run/model")
    assert space.vae_class == ("AutoencoderKLWan" if run.kind == "wan" else "AutoencoderKL")
    assert Path(space.path, space.subfolder or "") == run.vae_dir.resolve()
    video, _ = read_clip(run.root / "run/samples/step_00000002.mp4")  # 1 + 4 latents, decoded
    assert video.shape == (space.pixel_frames(5), 3, 16 * 4, 2 * 16 * 4)  # generated | real, 4x


def test_sample_encodes_the_context_and_writes_pixels(run, tmp_path, capsys):
    out = tmp_path / "rollout.mp4"
    model = str(run.root / "run/model")
    context = str(run.videos / "val-000000.tar")
    args = ["--context", context, "--context-frames", "1", "--frames", "6", "--steps", "2", "--seed", "0"]
    main(["sample", "--model", model, *args, "--out", str(out)])
    space = LatentSpace.of_model(model)
    video, _ = read_clip(out)
    assert video.shape == (space.pixel_frames(7), 3, 16, 16)  # past the horizon of 3 or 4 latents
    pair, _ = read_clip(tmp_path / "rollout_vs_real.mp4")
    assert pair.shape == (space.pixel_frames(7), 3, 16, 32)


def test_eval_scores_decoded_frames_against_reconstruction_and_original(run, tmp_path):
    model, out = str(run.root / "run/model"), tmp_path / "eval"
    args = ["--clips", "2", "--context-frames", "1", "--frames", "4", "--steps", "2", "--elbo-draws", "2"]
    main(["eval", "--model", model, "--data", str(run.latents / "val-*.tar"), *args, "--out", str(out)])
    result = json.loads((out / "metrics.json").read_text())
    space = LatentSpace.of_model(model)
    assert result["horizon"] == space.pixel_frames(3 if run.kind == "wan" else 4)
    assert result["frames"]["index"] == list(range(space.pixel_frames(1), space.pixel_frames(5)))
    summary = result["summary"]
    for key in ("mse_past_horizon", "mse_vs_original_past_horizon", "balls_found_past_horizon"):
        assert summary[key] == summary[key], key  # present and not nan
    assert "elbo_bits_per_latent_dim" in summary


def test_bad_inputs_are_named(run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(run.root / "run/model", model)
    record = json.loads((model / "vae.json").read_text())
    (model / "vae.json").write_text(json.dumps({**record, "path": str(tmp_path / "gone")}))
    argv = [
        "sample",
        "--model",
        str(model),
        "--frames",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "a.mp4"),
    ]
    with pytest.raises(
        SystemExit, match=rf"is not where it was looked for: no VAE folder {tmp_path / 'gone'}"
    ):
        main(argv)
    main([*argv, "--vae", str(run.root / "pipeline")])  # told where it is, it samples
    assert (tmp_path / "a.mp4").exists()

    other = "wan" if run.kind == "kl" else "kl"
    foreign = tmp_path / "foreign"
    make_vae, subfolder, *_ = KINDS[other]
    save(make_vae(), foreign / "vae" / (subfolder or ""))
    frames = 5 if other == "wan" else 4
    write_bouncing_balls(tmp_path / "videos", num_clips=2, frames=frames, size=16, num_balls=1, seed=2)
    vae_args = ["--vae", str(foreign / "vae"), *(["--subfolder", subfolder] if subfolder else [])]
    main(["encode-latents", str(tmp_path / "videos/train-000000.tar"), *vae_args, "--out", str(foreign)])
    data = [
        "--data",
        str(foreign / "train-000000.tar"),
        "--clips",
        "1",
        "--context-frames",
        "1",
        "--frames",
        "1",
    ]
    with pytest.raises(SystemExit, match="latents of another VAE than the model's: vae_class"):
        main(["eval", "--model", str(run.root / "run/model"), *data, "--elbo-draws", "0"])

    with pytest.raises(ConfigError, match=r"validation\.shards: data\.shards hold videos, the held-out"):
        train(
            load_config(
                run.config,
                [f"data.shards={run.videos}/train-000000.tar", f"output_dir={tmp_path / 'elsewhere'}"],
            )
        )
    with pytest.raises(ConfigError, match=r"validation\.shards: latents of another VAE than data\.shards'"):
        train(load_config(run.config, [f"validation.shards={foreign}/train-000000.tar"]))


def test_ablate_scores_latent_runs(run, tmp_path):
    root = ablate(
        run.config,
        ["paths"],
        1,
        schedules=["autoregressive"],
        clips=2,
        elbo_draws=0,
        out=tmp_path,
        progress=False,
    )
    (row,) = list(csv.DictReader((root / "results.csv").open()))
    assert row["weighting"] == "paths" and float(row["mse_past_horizon"]) >= 0
