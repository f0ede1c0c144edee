"""`python -m dforce ...`, which `accelerate launch -m dforce train CONFIG` runs on every process."""

from dforce.cli import main

main()
