"""dforce: a trainer for video diffusion models in which every frame carries its own noise level."""

__version__ = "0.1.0"
