"""What a run prints: a progress bar on a terminal; into a file or a pipe, one plain line per `log_every`
steps (step, loss, samples/s, ETA) and the validation figures on lines of their own, no carriage return."""

from __future__ import annotations

import re

from conftest import Terminal

from dforce.training.config import load_config
from dforce.training.train import train
from dforce.training.trainer import log_line

OVERRIDES = [
    "train.max_steps=6",
    "train.checkpoint_every=6",
    "train.log_every=2",
    "validation.every=3",
    "validation.batches=1",
    "validation.weightings=[paths]",
    "validation.rollout_clips=0",
    "validation.context_frames=2",
    "validation.rollout_frames=4",
    "validation.sampling_steps=2",
]
STEP_LINE = re.compile(r"train step (\d+)/6: loss \d+\.\d{4}, \d+\.\d samples/s, ETA \d{2}:\d{2}")


def run(config_file, data) -> None:
    train(load_config(config_file, [*OVERRIDES, f"validation.shards={data}/val-*.tar"]))


def test_a_log_that_is_no_terminal_gets_plain_lines(config_file, data, capsys):
    run(config_file, data)
    out, err = capsys.readouterr()  # neither is a terminal
    assert "\r" not in out and "\r" not in err
    lines = out.splitlines()
    assert [int(m[1]) for m in map(STEP_LINE.fullmatch, lines) if m] == [2, 4, 6]
    assert not any("train step" in line for line in lines if not STEP_LINE.fullmatch(line))
    validation = [line for line in lines if line.startswith(("step ", "held-out"))]
    assert [line.split(":")[0] for line in validation] == ["step 3", "step 6", "held-out next-frame MSE"]
    assert validation[0].startswith("step 3: loss_paths") and "copying the last frame" in validation[2]


def test_a_terminal_gets_the_bar(config_file, data, monkeypatch):
    """The bar as before (redrawn with \\r, the loss beside it), no plain step lines, and the validation
    figures still on lines of their own."""
    terminal, screen = Terminal(), Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("sys.stdout", screen)
    run(config_file, data)
    out, bar = screen.getvalue(), terminal.getvalue()
    assert "\r" in bar and "6/6" in bar and "loss=" in bar
    assert not any(map(STEP_LINE.fullmatch, out.splitlines()))
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith(("step ", "held-out"))] == [
        "step 3",
        "step 6",
        "held-out next-frame MSE",
    ]


def test_stdout_to_a_file_gets_plain_lines_beside_the_bar(config_file, data, capsys, monkeypatch):
    """`make demo > log`: the bar stays on the terminal, the log gets the plain lines."""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    run(config_file, data)
    out = capsys.readouterr().out
    assert "\r" in terminal.getvalue() and "\r" not in out
    assert [int(m[1]) for m in map(STEP_LINE.fullmatch, out.splitlines()) if m] == [2, 4, 6]


def test_the_line_names_the_objectives_headline_and_rate():
    logs = {"generator/dmd_loss": 0.123456, "lr": 1e-4, "rollouts_per_s": 12.34}
    line = log_line("self-forcing", 40, 100, logs, 3725.0)
    assert line == "self-forcing step 40/100: generator/dmd_loss 0.1235, 12.3 rollouts/s, ETA 1:02:05"
