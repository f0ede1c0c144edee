"""`dforce train CONFIG [key=value ...]`: the config's objective, run by the one training loop."""

from __future__ import annotations

from pathlib import Path

from dforce.training.config import Config
from dforce.training.objectives.denoising import Denoising
from dforce.training.objectives.self_forcing import SelfForcingObjective
from dforce.training.run_record import plan_start
from dforce.training.trainer import Objective, Trainer, data_space

# The config's `objective` key -> the objective's class; a new objective is a module and a line here.
OBJECTIVES: dict[str, type[Objective]] = {"denoising": Denoising, "self_forcing": SelfForcingObjective}


def train(config: Config, resume: str = "auto") -> Path:
    """Train `config`, resuming its run (`resume`: auto, never or a checkpoint; `dforce.training.run_record`)
    once its directory is checked to hold the same run; return the exported EMA model directory."""
    start = plan_start(config, resume)  # before anything is built: a mismatch stops here
    space = data_space(config)  # and so do shards the config cannot use
    return Trainer(config, start, space).fit(OBJECTIVES[config.objective])
