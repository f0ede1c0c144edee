"""`dforce train CONFIG [key=value ...]`: the config's objective, run by the one training loop."""

from __future__ import annotations

from pathlib import Path

from dforce.config import Config
from dforce.objectives.denoising import Denoising
from dforce.objectives.self_forcing import SelfForcingObjective
from dforce.run_record import plan_start
from dforce.trainer import Objective, Trainer, data_space

# The config's `objective` key -> the objective's class; a new objective is a module and a line here.
OBJECTIVES: dict[str, type[Objective]] = {"denoising": Denoising, "self_forcing": SelfForcingObjective}


def train(config: Config, resume: str = "auto") -> Path:
    """Train `config`, resuming its run (`resume`: auto, never or a checkpoint; `dforce.run_record`)
    once its directory is checked to hold the same run; return the exported EMA model directory."""
    start = plan_start(config, resume)  # before anything is built: a mismatch stops here
    space = data_space(config)  # and so do shards the config cannot use
    return Trainer(config, start, space).fit(OBJECTIVES[config.objective])
