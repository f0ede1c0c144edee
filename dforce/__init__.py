"""dforce: a trainer for video diffusion models in which every frame carries its own noise level."""

__version__ = "0.1.0"


class DforceError(Exception):
    """A problem with a run or its input that the CLI reports in one line, without a traceback."""
