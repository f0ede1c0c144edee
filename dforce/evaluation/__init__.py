"""Judging trained models: per-frame scores, summaries by horizon band, `dforce eval`, `dforce compare`,
the weighting ablation and its plots."""
