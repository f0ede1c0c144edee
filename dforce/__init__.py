"""dforce: a trainer for video diffusion models in which every frame carries its own noise level.

The names most scripts need, importable from the top (`from dforce import CausalVideoTransformer, rollout`);
each is imported on first use, so that `dforce --help` starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


class DforceError(Exception):
    """A problem with a run or its input that the CLI reports in one line, without a traceback."""


# name -> the module that defines it (the layer folders of docs/ARCHITECTURE.md)
PUBLIC = {
    "NoiseConfig": "dforce.diffusion.noise",
    "NoiseSchedule": "dforce.diffusion.noise",
    "scheduling_matrix": "dforce.diffusion.scheduling",
    "get_weighting": "dforce.diffusion.trajectory",
    "DenoisingLoss": "dforce.diffusion.loss",
    "rollout": "dforce.diffusion.rollout",
    "SamplingRecipe": "dforce.diffusion.recipe",
    "CausalVideoTransformer": "dforce.models.model",
    "CausalWan": "dforce.models.wan",
    "Backbone": "dforce.models.backbone",
    "DataConfig": "dforce.data.clips",
    "make_loader": "dforce.data.loader",
    "write_bouncing_balls": "dforce.data.synthetic",
    "Text": "dforce.data.text",
    "Config": "dforce.training.config",
    "load_config": "dforce.training.config",
    "train": "dforce.training.train",
    "load_model": "dforce.training.checkpoint",
    "evaluate": "dforce.evaluation.evaluate",
}

__all__ = ["DforceError", "__version__", *PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in PUBLIC:
        raise AttributeError(f"module 'dforce' has no attribute {name!r}")
    value = getattr(importlib.import_module(PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
