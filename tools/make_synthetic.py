"""Bouncing-balls shards, the built-in dataset; the same as `dforce make-synthetic`."""

import sys

from dforce.cli import main

if __name__ == "__main__":
    main(["make-synthetic", *sys.argv[1:]])
