"""What a run directory says about itself, and the check that a rerun continues the same run.

`output_dir/runs.jsonl` holds one line per start of the run: when, at which step and from which
checkpoint, which keys changed since the start before, and the config as given (before an objective
completes it; `config.yaml` holds the completed config of the latest start). Before anything is built,
`plan_start` compares the config with the recorded one: a change to a key that defines the run stops
with every differing key listed; the keys in `RESUMABLE` may change, and take effect from the resumed
step. Nothing is deleted: `--resume never` moves an earlier run aside, `--resume PATH` moves the
checkpoints after PATH aside.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from dforce.training.checkpoint import CHECKPOINTS, list_checkpoints
from dforce.training.config import Config, ConfigError

RECORD = "runs.jsonl"
CONFIG = "config.yaml"

# Dotted keys (a trailing dot: the whole section) that a resumed run may change; every other key
# defines the run. Learning rates and their schedule take effect from the resumed step
# (`dforce.training.checkpoint.resume` rebases the loaded schedulers on the config's).
RESUMABLE = (
    "train.max_steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.lr",
    "train.lr_scheduler",
    "train.warmup_steps",
    "train.mixed_precision",
    "train.frozen_fp32",
    "train.gradient_checkpointing",
    "train.attention_backend",
    "train.compile",
    "train.trackers",
    "train.project",
    "train.run_name",
    "data.num_workers",
    "data.pixels",
    "self_forcing.critic_lr",
    "validation.",
)


class RunMismatch(ConfigError):
    """The run directory holds a run of another config."""


@dataclasses.dataclass
class Start:
    """How a run starts, decided from its directory before anything is built."""

    fresh: bool = True  # nothing is loaded; else the newest checkpoint that loads (after the moves)
    changed: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # resumable keys
    move_aside: dict[Path, Path] = dataclasses.field(default_factory=dict)  # done before anything is written


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (anything but a dict is a leaf; an empty section is one too)."""
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def recorded_config(run: Path) -> dict[str, Any] | None:
    """The config as given at the latest start of the run in `run`, or None if nothing was recorded."""
    record = run / RECORD
    if record.exists():
        lines = [line for line in record.read_text().splitlines() if line.strip()]
        if lines:
            return json.loads(lines[-1])["config"]
    if (run / CONFIG).exists():  # a run started before the record existed
        return yaml.safe_load((run / CONFIG).read_text())
    return None


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs; `output_dir` is where, not what."""
    a, b = flatten(old), flatten(new)
    missing = "(unset)"
    return {
        key: (a.get(key, missing), b.get(key, missing))
        for key in sorted(a.keys() | b.keys())
        if key != "output_dir" and a.get(key, missing) != b.get(key, missing)
    }


def plan_start(config: Config, resume: str = "auto") -> Start:
    """Decide how `config`'s run starts: resume (`auto`: the newest checkpoint; a path: that one) or
    start afresh (`never`, or nothing to resume); raise `RunMismatch` if the directory's run is another."""
    run = Path(config.output_dir)
    given = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as recorded
    checkpoints = list_checkpoints(run / CHECKPOINTS)
    recorded = recorded_config(run)
    if resume == "never":
        aside = {run: _free(run, "previous")} if run.exists() and any(run.iterdir()) else {}
        return Start(move_aside=aside)
    chosen = None
    if resume != "auto":
        chosen = Path(resume)
        if chosen.resolve() not in [c.resolve() for c in checkpoints]:
            found = ", ".join(c.name for c in checkpoints) or "none"
            raise ConfigError(
                f"--resume {resume}: not a checkpoint of {run} (it has: {found}); give auto, never or "
                f"one of {run / CHECKPOINTS}/step_N"
            )
        checkpoints = checkpoints[: [c.resolve() for c in checkpoints].index(chosen.resolve()) + 1]
    if not checkpoints:
        return Start()
    changed = differences(recorded, given) if recorded is not None else {}
    defining = {key: change for key, change in changed.items() if not resumable(key)}
    if defining:
        listed = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in defining.items())
        raise RunMismatch(
            f"{run} holds a run of another config, which differs in {listed}. Train this config with "
            f"another output_dir (e.g. output_dir={run}-2), or with `dforce train CONFIG --resume never` "
            f"to start over (the old run is moved aside, nothing is deleted)"
        )
    step = int(checkpoints[-1].name[5:])
    if step > config.train.max_steps:
        raise ConfigError(
            f"train.max_steps: {run} is at step {step}, past max_steps={config.train.max_steps}; raise it "
            f"to train on, or use {checkpoints[-1].parent}/step_N with --resume for an earlier checkpoint"
        )
    later = list_checkpoints(run / CHECKPOINTS)[len(checkpoints) :]
    aside = {}
    if later:  # --resume PATH: the run continues from PATH; the checkpoints after it are kept apart
        folder = _free(run / CHECKPOINTS, "superseded")
        aside = {c: folder / c.name for c in later}
    return Start(fresh=False, changed=changed, move_aside=aside)


def _free(path: Path, label: str) -> Path:
    """`path.label-N` for the first N not taken."""
    n = 1
    while path.with_name(f"{path.name}.{label}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{label}-{n}")


def move_aside(start: Start) -> list[str]:
    """Do `start.move_aside` (main process only); -> one line per move, to print."""
    lines = []
    for source, target in start.move_aside.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(source), str(target))
        lines.append(f"moved {source} to {target} (nothing is deleted)")
    return lines


def record_start(
    run: Path, given: Config, completed: Config, start: Start, step: int, checkpoint: Path | None
) -> None:
    """Append this start to `runs.jsonl` and write the completed config to `config.yaml` (main process)."""
    run.mkdir(parents=True, exist_ok=True)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "changed": {key: list(change) for key, change in start.changed.items()},
        "config": json.loads(json.dumps(dataclasses.asdict(given))),
    }
    with (run / RECORD).open("a") as record:
        record.write(json.dumps(entry) + "\n")
    (run / CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(completed), sort_keys=False))
