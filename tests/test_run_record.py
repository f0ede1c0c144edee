"""A rerun continues the same run or stops: a changed defining key is refused with every `old -> new`
before anything is built, an allowed change takes effect from the resumed step, and the run directory's
record and config.yaml stay truthful; `never` and PATH move things aside, never delete."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import reset_accelerate
from diffusers.optimization import get_scheduler

from dforce.training.checkpoint import rebase
from dforce.training.config import ConfigError, load_config
from dforce.training.run_record import RunMismatch, differences, plan_start, resumable
from dforce.training.train import train


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines()]


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def optimizer_lr(run, step: int) -> float:
    state = torch.load(run / "checkpoints" / f"step_{step:08d}" / "optimizer.bin", weights_only=False)
    return state["param_groups"][0]["lr"]


def test_differences_and_resumable_keys():
    old = {"output_dir": "a", "seed": 0, "train": {"lr": 1e-3, "betas": [0.9, 0.99]}, "model": {}}
    new = {"output_dir": "b", "seed": 1, "train": {"lr": 1e-3, "betas": [0.9, 0.9]}, "model": {"n": 2}}
    assert differences(old, new) == {
        "model": ({}, "(unset)"),
        "model.n": ("(unset)", 2),
        "seed": (0, 1),
        "train.betas": ([0.9, 0.99], [0.9, 0.9]),
    }
    assert resumable("train.max_steps") and resumable("validation.every") and resumable("train.lr")
    assert not any(map(resumable, ["seed", "train.batch_size", "trajectory.name", "data.shards", "model.x"]))


def test_changed_defining_keys_are_refused_before_anything_is_built(tmp_path, config_file):
    run = tmp_path / "run"
    train(load_config(config_file, ["train.max_steps=4"]))
    before = (run / "config.yaml").read_text(), (run / "runs.jsonl").read_text()
    reset_accelerate()
    changed = load_config(config_file, ["train.max_steps=8", "trajectory.name=teacher", "seed=5"])
    with pytest.raises(RunMismatch) as error:
        plan_start(changed)
    message = str(error.value)
    assert "seed: 0 -> 5" in message and "trajectory.name: 'paths' -> 'teacher'" in message
    assert "max_steps" not in message  # allowed, so not listed as a reason
    assert "--resume never" in message and "output_dir=" in message and "\n" not in message
    with pytest.raises(RunMismatch):
        train(changed)
    assert ((run / "config.yaml").read_text(), (run / "runs.jsonl").read_text()) == before
    assert checkpoints(run) == ["step_00000004"]


def test_allowed_changes_take_effect_and_are_recorded(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    train(load_config(config_file, ["train.max_steps=8"]))
    assert optimizer_lr(run, 8) == pytest.approx(2e-3)
    reset_accelerate()
    train(load_config(config_file, ["train.max_steps=12", "train.lr=5e-4", "train.keep_checkpoints=0"]))
    assert "changed: train.keep_checkpoints 3 -> 0, train.lr 0.002 -> 0.0005" in capsys.readouterr().out
    assert optimizer_lr(run, 12) == pytest.approx(5e-4)  # the loaded schedule was rebased
    assert checkpoints(run) == [f"step_{s:08d}" for s in (4, 8, 12)]  # keep_checkpoints 0 keeps all
    first, second = records(run)
    assert (first["step"], first["checkpoint"], first["changed"]) == (0, None, {})
    assert second["step"] == 8 and second["checkpoint"].endswith("step_00000008")
    assert second["changed"] == {
        "train.keep_checkpoints": [3, 0],
        "train.lr": [0.002, 0.0005],
        "train.max_steps": [8, 12],
    }
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert (written["train"]["max_steps"], written["train"]["lr"]) == (12, 5e-4)

    reset_accelerate()  # the same command again: nothing changed, nothing to train
    train(load_config(config_file, ["train.max_steps=12", "train.lr=5e-4", "train.keep_checkpoints=0"]))
    assert records(run)[-1]["changed"] == {} and records(run)[-1]["step"] == 12
    with pytest.raises(ConfigError, match=r"train\.max_steps: .* is at step 12, past max_steps=4"):
        plan_start(load_config(config_file, ["train.max_steps=4"]))


def test_resume_never_and_path_move_aside(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    train(load_config(config_file, ["train.max_steps=8", "train.keep_checkpoints=0"]))
    reset_accelerate()
    train(load_config(config_file, ["train.max_steps=12", "trajectory.name=teacher"]), resume="never")
    assert f"moved {run} to {run}.previous-1" in capsys.readouterr().out
    assert checkpoints(tmp_path / "run.previous-1") == ["step_00000004", "step_00000008"]
    assert len(records(run)) == 1 and records(run)[0]["config"]["trajectory"]["name"] == "teacher"

    reset_accelerate()
    with pytest.raises(ConfigError, match=r"--resume .*step_00000099: not a checkpoint of"):
        plan_start(
            load_config(config_file, ["trajectory.name=teacher"]), str(run / "checkpoints/step_00000099")
        )
    path = run / "checkpoints" / "step_00000004"
    train(load_config(config_file, ["trajectory.name=teacher"]), resume=str(path))
    assert records(run)[-1]["step"] == 4
    aside = run / "checkpoints.superseded-1"
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000008", "step_00000012"]


def test_rebase_puts_the_new_rate_under_the_loaded_schedule():
    def cosine(lr: float):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)

    optimizer, scheduler = cosine(1.0)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    optimizer, scheduler = cosine(0.5)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))  # lr 1
    rebase(scheduler, [0.5])
    expected = 0.5 * 0.5 * (1 + math.cos(math.pi * 3 / 8))  # lr 0.5 at step 5: 3 of 8 steps past warmup
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
