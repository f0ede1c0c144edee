"""`dforce ablate` on a tiny grid: every cell of the table filled, every file written, and a rerun that
trains and evaluates nothing again."""

from __future__ import annotations

import csv
import json
import re

import pytest

import dforce.evaluation.ablate
from dforce.cli import main
from dforce.data.synthetic import write_bouncing_balls
from dforce.diffusion.trajectory import get_weighting
from dforce.evaluation.ablate import AblationError, ablate, markdown_table
from dforce.training.config import load_config

CONFIG = """\
output_dir: {out}
seed: 0
train: {{max_steps: 3, checkpoint_every: 3, batch_size: 2, log_every: 3, lr: 2e-3, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, shuffle_buffer: 4}}
noise: {{levels: 20}}
model: {{sample_size: 16, patch_size: 8, num_layers: 1, num_attention_heads: 2, attention_head_dim: 8}}
validation: {{shards: "{data}/val-*.tar", every: 3, batches: 1, weightings: [teacher], rollout_clips: 0,
             context_frames: 2, rollout_frames: 4, sampling_steps: 2}}
"""
WEIGHTINGS = ["teacher", "schedule:pyramid"]
SCHEDULES = ["autoregressive", "pyramid", "sync"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    write_bouncing_balls(root / "data", num_clips=4, frames=4, size=16, num_balls=2, seed=0)
    write_bouncing_balls(root / "data", num_clips=4, frames=6, size=16, num_balls=2, seed=1, prefix="val")
    path = root / "ablation.yaml"
    path.write_text(CONFIG.format(out=root / "out", data=root / "data"))
    return path


def test_a_tiny_grid_fills_every_cell_and_resumes(config_file, monkeypatch, capsys):
    args = ["ablate", str(config_file), "--weightings", ",".join(WEIGHTINGS), "--seeds", "2", "--clips", "3"]
    main([*args, "--elbo-draws", "2", "train.lr=1e-3"])  # an override after the options
    root = config_file.parent / "out"
    printed = capsys.readouterr().out
    table = (root / "results.md").read_text()
    assert table.splitlines()[-1] in printed
    main_table, band_table = table.split("By horizon multiple")
    *body, baseline = [
        line for line in main_table.splitlines() if line.startswith("| ") and "---" not in line
    ][1:]
    assert [line.split(" | ")[:2] for line in body] == [[f"| {w}", s] for w in WEIGHTINGS for s in SCHEDULES]
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")[2:]]
        number = r"-?\d+\.\d+ ± \d+\.\d+"
        # The ball error is undefined ("–") where three steps of training find no ball in any frame.
        assert len(cells) == 6 and all(re.fullmatch(number, c) for c in cells[:3] + cells[4:]), line
        assert re.fullmatch(f"{number}|–", cells[3]), line
    cells = [c.strip() for c in baseline.strip("|").split("|")]
    assert cells[:2] == ["copy the last context frame", "–"] and cells[-1] == "–"  # no ELBO for a copy
    assert all(re.fullmatch(r"\d+\.\d+", c) for c in cells[2:-1]), baseline
    # Horizon 4, frames 2..5: the 0-1x and 1-2x bands, balls found and ball error in each.
    header, *rows = [line for line in band_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert "all balls found 0-1x" in header and "ball error 1-2x (px)" in header and "2-4x" not in header
    assert len(rows) == len(WEIGHTINGS) * len(SCHEDULES) + 1
    found = [c.strip() for c in rows[0].strip("|").split("|")][2:4]
    assert all(re.fullmatch(r"\d\.\d\d ± \d\.\d\d", c) for c in found), rows[0]

    with (root / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == len(WEIGHTINGS) * 2 * len(SCHEDULES)
    assert {(r["weighting"], r["seed"]) for r in rows} == {(w, s) for w in WEIGHTINGS for s in ("0", "1")}
    with (root / "frames.csv").open() as file:
        frames = list(csv.DictReader(file))
    assert len(frames) == len(rows) * 4 and {r["frame"] for r in frames} == {"2", "3", "4", "5"}
    with (root / "loss_by_level.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(WEIGHTINGS) * 2 * 10
    for name in ("psnr_vs_frame.png", "loss_by_level.png", "weightings.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "runs" / "schedule-pyramid" / "seed1" / "model" / "config.json").is_file()

    # Rerun: finished runs are not trained again, cached evaluations not redone, the same table results.
    def fail(*args, **kwargs):
        raise AssertionError("nothing should be recomputed")

    monkeypatch.setattr(dforce.evaluation.ablate, "train", fail)
    monkeypatch.setattr(dforce.evaluation.ablate, "evaluate", fail)
    monkeypatch.setattr(dforce.evaluation.ablate, "held_out_loss_by_level", fail)
    ablate(config_file, WEIGHTINGS, 2, ["train.lr=1e-3"], clips=3, elbo_draws=2, progress=False)
    assert (root / "results.md").read_text() == table


class Scored(Exception):
    """Raised by a spy in place of an evaluation."""


def test_each_model_is_scored_with_its_own_recipe(config_file, monkeypatch, capsys):
    """Each model is sampled as its sampling.json says, under each schedule of --schedules; a run exported
    before models carried a recipe as its config validates it."""
    grid = dict(clips=3, elbo_draws=2, schedules=["autoregressive"], progress=False)
    ablate(config_file, ["teacher"], 1, ["train.lr=1e-3"], **grid)  # trained (and scored) by now
    recipe = config_file.parent / "out/runs/teacher/seed0/model/sampling.json"
    saved, seen = recipe.read_text(), []

    def spy(model, noise, clips, settings, decoder=None):
        seen.append(settings)
        raise Scored

    monkeypatch.setattr(dforce.evaluation.ablate, "evaluate", spy)
    try:
        recipe.write_text(json.dumps({**json.loads(saved), "steps": 3, "history_guidance": 1.5}))
        capsys.readouterr()
        with pytest.raises(Scored):
            ablate(config_file, ["teacher"], 1, ["train.lr=1e-3"], **grid)
        assert (seen[0].steps, seen[0].history_guidance, seen[0].scheduling) == (3, 1.5, "autoregressive")
        assert (
            "ablate: sampling: ddim, 3 steps, autoregressive, history guidance 1.5 "
            "(from the model's sampling.json; --schedules given)"
        ) in capsys.readouterr().out
        recipe.unlink()  # the config's own: validation.sampling_steps 2, the evaluation already cached
        ablate(config_file, ["teacher"], 1, ["train.lr=1e-3"], **grid)
        assert "sampling: ddim, 2 steps, autoregressive (the run's config: no sampling.json in" in (
            capsys.readouterr().out
        )
    finally:
        recipe.write_text(saved)


def test_bad_grids_fail_before_training(config_file):
    with pytest.raises(AblationError, match="unknown weighting 'bogus'"):
        ablate(config_file, ["paths", "bogus"], 1)
    with pytest.raises(AblationError, match=r"validation\.shards must name held-out clips"):
        ablate(config_file, ["paths"], 1, ["validation.shards=null"])
    with pytest.raises(AblationError, match=r"unknown \['spiral'\]"):
        ablate(config_file, ["paths"], 1, schedules=["sync", "spiral"])


def test_table_shows_missing_cells_and_single_seeds():
    rows = [
        {"weighting": "paths", "schedule": "sync", "psnr_in_horizon": 10.0, "elbo_bits_per_dim": 3.0},
        {
            "weighting": "paths",
            "schedule": "sync",
            "psnr_in_horizon": 12.0,
            "elbo_bits_per_dim": float("nan"),
        },
    ]
    table = markdown_table(rows, ["paths", "teacher"], ["sync"])
    assert "| paths | sync | 11.00 ± 1.41 | 3.00 |" in table  # one ELBO value: no spread
    assert "| teacher | sync | – | – |" in table


def test_the_cpu_ablation_config_loads_and_scores_past_its_horizon():
    config = load_config("configs/ablation.yaml")
    assert config.validation.shards and config.validation.rollout_frames + 4 > 2 * config.data.clip_frames
    for name in ("independent", "paths", "teacher", "sync", "schedule:pyramid"):
        get_weighting(
            name, config.data.clip_frames, config.noise.levels, cube_levels=config.trajectory.cube_levels
        )
