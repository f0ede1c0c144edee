"""The training loop end to end on a tiny model: it learns, resumes bitwise, survives bad checkpoints and
non-finite losses, and runs on two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import launch_two_processes, reset_accelerate
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dforce.cli import main
from dforce.data.video import read_clip
from dforce.diffusion.loss import DenoisingLoss
from dforce.models.model import CausalVideoTransformer
from dforce.training.checkpoint import TrainingStopped
from dforce.training.config import ConfigError, load_config
from dforce.training.engine import make_loss
from dforce.training.train import train
from dforce.training.trainer import mixed_precision


def run_cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dforce", *args], env=env, text=True, **popen)


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_overfits_one_batch(config_file):
    """One fixed batch of 2 clips: the loss on it, at fixed seeds, falls far below the zero model's."""
    config = load_config(
        config_file,
        [
            "train.max_steps=150",
            "train.checkpoint_every=150",
            "train.ema_decay=0.0",
            "data.samples_per_epoch=2",
            "data.shuffle=false",
            "data.clip_start=0",
        ],
    )
    model_dir = train(config)
    trained = CausalVideoTransformer.from_pretrained(model_dir)
    loss_fn = make_loss(config, config.trajectory.name, trained.frames_per_block)
    batch = next(_batches(config))
    untrained = CausalVideoTransformer(**trained.config)

    def mean_loss(model) -> float:
        with torch.no_grad():
            return sum(loss_fn(model, batch, seed=s).loss.item() for s in range(16)) / 16

    start, end = mean_loss(untrained), mean_loss(trained)
    assert end < 0.5 * start, (start, end)  # 0.96 -> 0.39 here


def _batches(config):
    from dforce.data.loader import to_float
    from dforce.training.trainer import clip_batches

    for batch in clip_batches(config, rank=0, world=1, consumed=0):
        yield to_float(batch["video"])


def test_killed_run_resumes_bitwise(tmp_path, config_file):
    """SIGKILL after the first checkpoint, rerun the same command: the weights equal an uninterrupted run."""
    overrides = ["train.max_steps=24", "train.gradient_accumulation=2", "train.warmup_steps=6"]
    reference = tmp_path / "reference"
    train(load_config(config_file, [*overrides, f"output_dir={reference}"]))

    run = tmp_path / "run"
    killed = run_cli("train", str(config_file), *overrides, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step_00000004").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (run / "checkpoints" / "step_00000024").exists()

    resumed = run_cli("train", str(config_file), *overrides, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stdout
    assert_bitwise_equal(weights(run, 24), weights(reference, 24))
    ema = load_file(run / "model" / "diffusion_pytorch_model.safetensors")
    assert_bitwise_equal(ema, load_file(reference / "model" / "diffusion_pytorch_model.safetensors"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000016",
        "step_00000020",
        "step_00000024",
    ]  # keep_checkpoints=3, no partial directory left


@pytest.mark.parametrize("start", [0, 100])
def test_the_ema_copies_the_weights_until_it_starts(tmp_path, config_file, start):
    """`train.ema_start`: before it the EMA is the weights themselves (diffusers' `update_after_step`), so a
    run shorter than it exports its last weights; from step 0 the average lags behind them."""
    overrides = ["train.max_steps=4", "train.checkpoint_every=4", "train.ema_decay=0.9"]
    run = tmp_path / "run"
    train(load_config(config_file, [*overrides, f"train.ema_start={start}", f"output_dir={run}"]))
    exported = load_file(run / "model" / "diffusion_pytorch_model.safetensors")
    last = weights(run, 4)
    same = all(torch.equal(exported[key], last[key]) for key in last)
    assert same == (start > 4)


def test_damaged_checkpoint_falls_back(tmp_path, config_file, capsys):
    run = tmp_path / "run"
    train(load_config(config_file, ["train.max_steps=8"]))
    latest = run / "checkpoints" / "step_00000008" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    reset_accelerate()
    train(load_config(config_file))
    out, err = capsys.readouterr()
    assert "step_00000008 is damaged" in err and "resumed from" in out and "step_00000004" in out

    reference = tmp_path / "reference"
    reset_accelerate()
    train(load_config(config_file, [f"output_dir={reference}"]))
    assert_bitwise_equal(weights(run, 12), weights(reference, 12))  # constant lr: 8 + resume == 12


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, config_file, monkeypatch):
    calls = {"n": 0, "bad": {3, 4}}
    original = DenoisingLoss.__call__

    def sometimes_nan(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in calls["bad"]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DenoisingLoss, "__call__", sometimes_nan)
    train(load_config(config_file))
    final = weights(tmp_path / "run", 12)
    assert all(w.isfinite().all() for w in final.values())
    state = torch.load(tmp_path / "run/checkpoints/step_00000012/custom_checkpoint_1.pkl", weights_only=True)
    assert state["nonfinite_steps"] == 2 and state["step"] == 12

    reset_accelerate()
    calls.update(n=0, bad=set(range(7, 100)))
    with pytest.raises(
        TrainingStopped, match=r"stopped at step 9: 3 non-finite losses in a row.*step_00000008"
    ):
        load = load_config(config_file, [f"output_dir={tmp_path / 'bad'}", "train.max_bad_steps=3"])
        train(load)
    assert (tmp_path / "bad/checkpoints/step_00000008").exists()  # skipped steps left the weights good


def test_validation_and_logs(tmp_path, config_file, data, capsys):
    """Held-out losses, next-frame error beside copying the last frame, rollouts, TensorBoard scalars."""
    overrides = [
        "train.max_steps=8",
        "train.trackers=[tensorboard]",
        f"validation.shards={data}/val-*.tar",
        "validation.every=4",
        "validation.batches=2",
        "validation.context_frames=2",
        "validation.rollout_frames=10",  # past the 4-frame horizon
        "validation.sampling_steps=3",
        "loss.drop_history=0.2",
        "validation.history_guidance=1.5",  # the sampled next frame and the rollouts guided
    ]
    train(load_config(config_file, overrides))
    out = capsys.readouterr().out
    assert (
        "step 8: loss_paths" in out and "held-out next-frame MSE" in out and "copying the last frame" in out
    )
    samples = tmp_path / "run/samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "step_00000004.gif",
        "step_00000004.mp4",
        "step_00000008.gif",
        "step_00000008.mp4",
    ]
    video, _ = read_clip(samples / "step_00000008.mp4")
    assert video.shape == (12, 3, 2 * 16 * 4, 2 * 16 * 4)  # 2 clips stacked, generated | real, 4x

    (events,) = (tmp_path / "run/logs/dforce").glob("events.out.tfevents.*")
    logged = EventAccumulator(str(events))
    logged.Reload()
    tags = logged.Tags()
    for tag in ["loss", "grad_norm", "lr", "samples_per_s", "skipped_samples", "val/next_frame_mse_1step"]:
        assert tag in tags["scalars"], tag
    assert any(tag.startswith("loss_by_level/") for tag in tags["scalars"])
    assert [e.step for e in logged.Scalars("val/loss_sync")] == [4, 8]
    assert "rollout" in tags["images"]


def test_cli_errors_are_one_line(tmp_path, config_file, data):
    for argv, message in [
        (["train", str(tmp_path / "missing.yaml")], "missing.yaml: cannot read config"),
        (["train", str(config_file), "train.lr=fast"], "train.lr: expected float, got 'fast'"),
        (["train", str(config_file), "data.shards=/nowhere/x.tar"], "/nowhere/x.tar"),
        (
            [
                "train",
                str(config_file),
                f"validation.shards={data}/val-*.tar",
                "validation.rollout_frames=40",
            ],
            "validation: the held-out shards cannot give 2 clips per rank, and 2 clips of context_frames + "
            "rollout_frames = 44 frames",
        ),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert message in str(exit.value) and "\n" not in str(exit.value)


def test_mixed_precision_from_the_launch():
    launched = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert mixed_precision(None, {}) == ("no", None)
    assert mixed_precision(None, launched) == ("bf16", None)
    assert mixed_precision("bf16", launched) == ("bf16", None)
    assert mixed_precision("no", launched) == (
        "no",
        "mixed precision: no (train.mixed_precision) wins over the launch's bf16",
    )
    with pytest.raises(
        ConfigError, match=r"launch asks for mixed precision 'fp16'; dforce trains in no or bf16"
    ):
        mixed_precision(None, {"ACCELERATE_MIXED_PRECISION": "fp16"})


PRECISION = """\
import sys
from dforce.training.config import ConfigError, load_config
from dforce.training.trainer import make_accelerator

accelerator = make_accelerator(load_config(sys.argv[1], sys.argv[2:]))
print(f"rank {accelerator.process_index}: {accelerator.mixed_precision}")
"""


def test_two_processes_take_precision_from_the_launch(tmp_path, config_file):
    script = tmp_path / "precision.py"
    script.write_text(PRECISION)
    out = launch_two_processes(script, str(config_file), port=29521, mixed_precision="bf16").stdout
    assert "rank 0: bf16" in out and "rank 1: bf16" in out and "wins" not in out
    out = launch_two_processes(
        script, str(config_file), "train.mixed_precision='no'", port=29521, mixed_precision="bf16"
    ).stdout
    assert "rank 0: no" in out and "rank 1: no" in out
    assert out.count("mixed precision: no (train.mixed_precision) wins over the launch's bf16") == 1


SPY = """\
import sys
from pathlib import Path
from safetensors.torch import save_file
import dforce.training.trainer as train

out = Path(sys.argv.pop(1))
clip_batches, export_model = train.clip_batches, train.export_model


def spy_batches(config, rank, world, consumed):
    for batch in clip_batches(config, rank, world, consumed):
        with open(out / f"keys_{rank}.txt", "a") as f:
            f.write("\\n".join(batch["key"]) + "\\n")
        yield batch


def spy_export(accelerator, model, ema, config, directory, *rest):
    state = {k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    save_file(state, out / f"weights_{accelerator.process_index}.safetensors")
    export_model(accelerator, model, ema, config, directory, *rest)


train.clip_batches, train.export_model = spy_batches, spy_export
from dforce.cli import main

main()
"""


def test_two_processes(tmp_path, config_file):
    """The documented multi-process command on CPU: two ranks over gloo, different data, same weights."""
    spy = tmp_path / "spy.py"
    spy.write_text(textwrap.dedent(SPY))
    launch_two_processes(spy, str(tmp_path), "train", str(config_file), "train.max_steps=4", port=29517)
    keys = [(tmp_path / f"keys_{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 8  # 4 steps x batch 2 on each rank
    assert not set(keys[0]) & set(keys[1])  # one epoch of 16 clips: 4 batches a rank, disjoint
    assert_bitwise_equal(*(load_file(tmp_path / f"weights_{rank}.safetensors") for rank in (0, 1)))
    assert (tmp_path / "run/model/noise.json").exists()


def test_validation_context_of_part_of_a_block_fails_before_a_step(config_file, data, tmp_path):
    """A model of one block of 4 frames (full attention over its horizon) cannot continue 2 frames of
    context: said before the first step, not at the first validation."""
    overrides = [
        "model.frames_per_block=4", f"validation.shards={data}/val-*.tar", "validation.context_frames=2",
        "validation.every=8",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"validation.context_frames=2: the model denoises blocks of 4"):
        train(load_config(config_file, overrides))
    assert not (tmp_path / "run/checkpoints").exists() or not any((tmp_path / "run/checkpoints").iterdir())
    reset_accelerate()
