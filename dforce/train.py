"""`dforce train CONFIG [key=value ...]`: the config's objective, run by the one training loop."""

from __future__ import annotations

from pathlib import Path

from dforce.config import Config
from dforce.objectives.denoising import Denoising
from dforce.objectives.self_forcing import SelfForcingObjective
from dforce.trainer import Objective, Trainer

# The config's `objective` key -> the objective's class; a new objective is a module and a line here.
OBJECTIVES: dict[str, type[Objective]] = {"denoising": Denoising, "self_forcing": SelfForcingObjective}


def train(config: Config) -> Path:
    """Train (or resume) `config`; return the exported EMA model directory."""
    return Trainer(config).fit(OBJECTIVES[config.objective])
