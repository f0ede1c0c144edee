"""`dforce eval` on a tiny model and generated shards: clips read with their physics, rollout paths at
one-level resolution, scores per frame index and their summaries, and the files written."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from dforce.cli import main
from dforce.data.reading import read_samples
from dforce.data.shards import ShardSink
from dforce.data.synthetic import write_bouncing_balls
from dforce.diffusion.likelihood import check_unit_steps, elbo, ode_nll
from dforce.diffusion.noise import NoiseConfig
from dforce.diffusion.rollout import rollout
from dforce.diffusion.trajectory import get_weighting
from dforce.evaluation.evaluate import (
    EvalSettings,
    copy_last_frame,
    evaluate,
    likelihoods,
    read_clips,
    rollout_path,
    rollout_scores,
    score_frames,
)
from dforce.evaluation.metrics import ball_errors
from dforce.models.model import CausalVideoTransformer

LEVELS = 20
TEXT_DIM = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("eval_balls")
    write_bouncing_balls(out, num_clips=3, frames=10, size=32, num_balls=2, seed=3, prefix="val")
    return str(out / "val-*.tar")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A random tiny model saved as training saves one: weights and noise.json."""
    torch.manual_seed(0)
    model = CausalVideoTransformer(
        sample_size=16, patch_size=4, num_frames=4, num_layers=1, num_attention_heads=2, attention_head_dim=8
    )
    out = tmp_path_factory.mktemp("model")
    model.save_pretrained(out)
    NoiseConfig(levels=LEVELS).save(out)
    return str(out)


def tiny_model() -> CausalVideoTransformer:
    torch.manual_seed(0)
    return CausalVideoTransformer(
        sample_size=16, patch_size=4, num_frames=4, num_layers=1, num_attention_heads=2, attention_head_dim=8
    ).eval()


@pytest.mark.parametrize("size", [None, 16])
def test_clips_come_with_their_physics_in_their_own_pixels(shards, size):
    """Balls found in the decoded (and resized) real frames sit where the record, rescaled, says."""
    clips = read_clips(shards, count=3, frames=8, size=size)
    side = size or 32
    assert clips.video.shape == (3, 8, 3, side, side) and clips.video.min() >= -1 and clips.video.max() <= 1
    assert len(clips.balls) == 3 and clips.balls[0]["states"].shape == (8, 2, 2)
    for frames, balls in zip(clips.video, clips.balls, strict=True):
        error, all_found = ball_errors(frames, balls["states"], balls["colors"], balls["radius"])
        assert all_found.all()
        assert error.max() < 0.3 * side / 32 + 0.1  # H.264 at crf 0, and antialiased resizing


def test_read_clips_names_a_short_clip_and_too_few_samples(shards):
    with pytest.raises(ValueError, match=r"val-000000.tar: sample 0003_0000000: too short: 10 frames"):
        read_clips(shards, count=1, frames=12)
    with pytest.raises(ValueError, match="3 samples, fewer than the 5 clips"):
        read_clips(shards, count=5, frames=8)


@pytest.mark.parametrize(
    ("scheduling", "options"), [("autoregressive", {}), ("pyramid", {"offset": 2}), ("sync", {})]
)
def test_rollout_path_is_the_rollout_at_one_level_steps(scheduling, options):
    """Chunks one after another, each frame through every level: a path the ELBO accepts."""
    model = tiny_model()
    settings = EvalSettings(scheduling=scheduling, steps=5, **options)
    path = rollout_path(model, LEVELS, settings)  # [S+1, 4]
    assert (path[0] == LEVELS).all() and (path[-1] == 0).all()
    drops = path[:-1] - path[1:]
    assert ((drops == 0) | (drops == 1)).all() and (drops.sum(dim=1) > 0).all()
    assert (drops.sum(dim=0) == LEVELS).all()  # every frame through every level
    check_unit_steps(get_weighting("schedule", 4, LEVELS, schedule=path))
    if scheduling == "autoregressive":
        assert len(path) == 4 * LEVELS + 1 and (drops.sum(dim=1) == 1).all()
    if scheduling == "pyramid":  # 2 frames a chunk, the second 2 steps x 4 levels behind the first
        assert path[8].tolist() == [12, 20, 20, 20] and path[9].tolist() == [11, 19, 20, 20]
    if scheduling == "sync":  # two chunks of two frames
        assert path[LEVELS].tolist() == [0, 0, 20, 20] and len(path) == 2 * LEVELS + 1


def test_scores_and_summary_agree(shards):
    model, noise = tiny_model(), NoiseConfig(levels=LEVELS)
    clips = read_clips(shards, count=3, frames=7, size=16)
    settings = EvalSettings(context_frames=2, steps=3, batch_size=2, elbo_draws=2)
    scores, frames_per_s = rollout_scores(model, noise, clips, settings)
    assert frames_per_s > 0
    assert set(scores) == {"mse", "psnr", "ssim", "ball_error", "balls_found", "ball_speed"}
    assert scores["ball_speed"][:, 0].isnan().all()  # no earlier generated frame to have moved from
    assert all(v.shape == (3, 5) for v in scores.values())
    torch.testing.assert_close(scores["psnr"], 10 * torch.log10(4 / scores["mse"]))
    result = evaluate(model, noise, clips, settings)
    frames, summary = result["frames"], result["summary"]
    assert frames["index"] == [2, 3, 4, 5, 6] and result["horizon"] == 4
    assert summary["mse_in_horizon"] == pytest.approx(scores["mse"][:, :2].mean().item())  # frames 2, 3
    assert summary["mse_past_horizon"] == pytest.approx(scores["mse"][:, 2:].mean().item())
    assert frames["psnr"][0] == pytest.approx(scores["psnr"][:, 0].mean().item())
    per_clip = scores["mse"][:, 2:].mean(dim=1)  # [3] frames 4..6: the 1-2x band
    assert summary["mse_1-2x"] == pytest.approx(per_clip.mean().item())
    assert summary["mse_1-2x_se"] == pytest.approx(per_clip.std().item() / math.sqrt(3))
    assert math.isfinite(summary["elbo_bits_per_dim"]) and summary["elbo_sem"] > 0
    again = evaluate(model, noise, clips, settings)  # seeded: the same numbers
    assert again["summary"] == summary


@pytest.fixture(scope="module")
def text_shards(shards, tmp_path_factory) -> str:
    """The clips of `shards` with text embeddings of 2, 3 and 4 tokens (`text.npy`, as encode-text writes)."""
    out = tmp_path_factory.mktemp("eval_text")
    rng = np.random.default_rng(0)
    with ShardSink(out, "val") as sink:
        for tokens, sample in enumerate(read_samples(shards), start=2):
            embeddings = io.BytesIO()
            np.save(embeddings, rng.standard_normal((tokens, TEXT_DIM)).astype(np.float16))
            kept = {key: sample[key] for key in ("__key__", "mp4", "json")}
            sink.write(kept | {"text.npy": embeddings.getvalue()})
    return str(out / "val-*.tar")


def test_clips_with_text_are_rolled_out_and_scored_given_it(text_shards):
    """A text model's rollouts and likelihoods read each held-out clip's own text."""
    torch.manual_seed(0)
    model = CausalVideoTransformer(
        sample_size=16,
        patch_size=4,
        num_frames=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        text_dim=TEXT_DIM,
    ).eval()
    with torch.no_grad():  # not DiT's zero start, from which the text changes nothing
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    noise, schedule = NoiseConfig(levels=LEVELS), NoiseConfig(levels=LEVELS).build()
    clips = read_clips(text_shards, count=3, frames=6, size=16)
    assert clips.text.mask.sum(dim=1).tolist() == [2, 3, 4] and clips.text.states.shape[2] == TEXT_DIM
    settings = EvalSettings(context_frames=2, steps=3, batch_size=3, elbo_draws=2, ode_steps=2, ode_probes=2)
    scores, _ = rollout_scores(model, noise, clips, settings)

    def rollout_mse(text):
        generator = torch.Generator().manual_seed(settings.seed)
        fake = rollout(model, schedule, "v", clips.video[:, :2], 4, steps=3, text=text, generator=generator)
        return score_frames(fake[:, 2:], clips.video[:, 2:], clips.balls, 2)["mse"]

    assert torch.equal(scores["mse"], rollout_mse(clips.text))
    assert not torch.allclose(scores["mse"], rollout_mse(None))
    nll = likelihoods(model, noise, clips, settings)
    x0 = clips.video[:, :4]
    weighting = get_weighting("schedule", 4, LEVELS, schedule=rollout_path(model, LEVELS, settings))
    given = elbo(model, schedule, "v", x0, weighting, draws=2, text=clips.text)
    assert torch.equal(nll["elbo"].nats, given.nats)
    assert not torch.allclose(given.nats, elbo(model, schedule, "v", x0, weighting, draws=2).nats)
    ode = ode_nll(model, schedule, "v", x0, path="autoregressive", steps=2, probes=2, text=clips.text)
    assert torch.equal(nll["ode"].nats, ode.nats)


def test_copying_the_last_frame_is_scored_like_a_rollout(shards):
    """The baseline: frame 2 held still, scored against frames 3, 4, 5; its balls where frame 2 had them."""
    clips = read_clips(shards, count=3, frames=6, size=16)
    scores = copy_last_frame(clips, context_frames=3)
    real, still = clips.video[:, 3:], clips.video[:, 2:3]
    torch.testing.assert_close(scores["mse"], (real - still).double().square().mean(dim=(2, 3, 4)))
    for clip, balls in enumerate(clips.balls):
        moved = (balls["states"][3:] - balls["states"][2]).norm(dim=-1).mean(dim=-1)  # [3] mean ball travel
        torch.testing.assert_close(scores["ball_error"][clip], moved, atol=0.3, rtol=0)


def test_cli_writes_json_csv_and_png(model_dir, shards, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--model", model_dir, "--data", shards, "--clips", "2", "--context-frames", "2"]
    main(
        [
            *args,
            "--frames",
            "6",
            "--steps",
            "2",
            "--schedule",
            "pyramid",
            "--out",
            str(out),
            "--ode-steps",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert "psnr_past_horizon" in printed and "ode_bits_per_dim" in printed and "mse_0-1x" not in printed
    assert "| MSE 0-1x |" in printed and "| copy the last context frame | – | – |" in printed  # the table
    result = json.loads((out / "metrics.json").read_text())
    assert result["settings"]["scheduling"] == "pyramid" and result["clips"] == 2
    with (out / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [int(r["frame"]) for r in rows] == list(range(2, 8))
    assert [int(r["inside_horizon"]) for r in rows] == [1, 1, 0, 0, 0, 0]
    assert float(rows[0]["psnr"]) == pytest.approx(result["frames"]["psnr"][0])
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_sets_evaluations_side_by_side_with_error_bars(model_dir, shards, tmp_path, capsys):
    """`dforce compare` reads two `dforce eval` folders of the same clips and seed, band by band."""
    args = ["eval", "--model", model_dir, "--data", shards, "--clips", "3", "--context-frames", "2"]
    args += ["--frames", "8", "--elbo-draws", "0"]
    main([*args, "--steps", "2", "--out", str(tmp_path / "a")])
    main([*args, "--steps", "3", "--out", str(tmp_path / "b")])
    capsys.readouterr()
    main(
        [
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--names",
            "two,three",
            "--out",
            str(tmp_path / "t.md"),
        ]
    )
    table = (tmp_path / "t.md").read_text()
    assert table in capsys.readouterr().out
    result = json.loads((tmp_path / "a" / "metrics.json").read_text())
    summary = result["summary"]  # horizon 4, frames 2..9: bands 0-1x (2, 3), 1-2x (4..7), 2-4x (8, 9)
    assert summary["mse_0-1x"] == pytest.approx(summary["mse_in_horizon"]) and "mse_4-8x" not in summary
    per_clip = torch.tensor(result["frames"]["mse"])  # the mean over clips per frame; per clip below
    assert summary["mse_1-2x"] == pytest.approx(per_clip[2:6].mean().item())
    copy = next(line for line in table.splitlines() if line.startswith("| copy the last context frame |"))
    speeds = [c.strip() for c in copy.strip("|").split("|")][3 + 2 * 3 : 3 + 3 * 3]
    assert speeds == ["0.00 ± 0.00"] * 3  # a ball held still does not move
    two = next(line for line in table.splitlines() if line.startswith("| two | 2 |"))
    cells = [c.strip() for c in two.strip("|").split("|")]
    assert len(cells) == 3 + 4 * 3  # model, steps, frames/s; 4 scores x 3 bands
    mean, se = (float(x) for x in cells[3 + 3 * 3].split(" ± "))  # MSE 0-1x
    assert mean == pytest.approx(summary["mse_0-1x"], abs=1e-4) and se == pytest.approx(
        summary["mse_0-1x_se"], abs=1e-4
    )
    assert summary["mse_0-1x_se"] > 0
    main([*args, "--steps", "2", "--seed", "1", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match=r"differs from .*a in seed: not one test"):
        main(["compare", str(tmp_path / "a"), str(tmp_path / "c")])
    with pytest.raises(SystemExit, match=r"nowhere/metrics\.json: no such file"):
        main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")])


def test_cli_names_a_missing_model(shards, tmp_path):
    with pytest.raises(SystemExit, match=r"no config\.json"):
        main(["eval", "--model", str(tmp_path), "--data", shards])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["sample", "--frames", "3", "--out", "a.mp4", "--sampler", "foo"],
            "--sampler: unknown sampler 'foo'; choose from ddim",
        ),
        (
            ["sample", "--frames", "3", "--out", "a.mp4", "--schedule", "foo"],
            "--schedule: unknown schedule 'foo'; choose",
        ),
        (
            ["eval", "--data", "x.tar", "--sampler", "foo"],
            "--sampler: unknown sampler 'foo'; choose from ddim, ddpm, euler",
        ),
        (
            ["eval", "--data", "x.tar", "--schedule", "foo"],
            "--schedule: unknown schedule 'foo'; choose from autoregressive",
        ),
    ],
)
def test_bad_names_fail_before_the_model_is_read(tmp_path, argv, message):
    """The model directory does not exist: the name is checked first, against the code's own table."""
    with pytest.raises(SystemExit) as exit:
        main([argv[0], "--model", str(tmp_path / "nowhere"), *argv[1:]])
    assert message in str(exit.value)
