"""Heatmaps of trajectory weightings; the same as `dforce plot-weights`."""

import sys

from dforce.cli import main

if __name__ == "__main__":
    main(["plot-weights", *sys.argv[1:]])
