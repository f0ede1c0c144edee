"""Training: the config, the run directory's record, checkpoints and the exported model, the EMA, the parts
of a step every objective shares, trackers, validation, the one loop (`trainer`) and the objectives it
runs."""
