"""`tools/study.py` end to end at toy length: a variant trains in its own process, is evaluated past
its horizon, and lands in the table and the plots; a rerun skips what is done."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

from dforce.data.synthetic import write_bouncing_balls

spec = importlib.util.spec_from_file_location("study", Path(__file__).parent.parent / "tools/study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # the dataclasses of a module loaded by path look themselves up here
spec.loader.exec_module(study)


def test_a_variant_is_trained_scored_and_plotted(tmp_path):
    data = tmp_path / "data"
    write_bouncing_balls(data, num_clips=16, frames=32, size=32, num_balls=3, seed=0)
    write_bouncing_balls(data, num_clips=8, frames=64, size=32, num_balls=3, seed=1, prefix="val")
    out = tmp_path / "study"
    args = ["--out", str(out), "--data", str(data), "--only", "size16", "--steps", "2", "--every", "2"]
    study.main([*args, "--clips", "2", "--jobs", "1"])
    (row,) = list(csv.DictReader((out / "results.csv").open()))
    assert row["variant"] == "size16" and float(row["train_cpu_min"]) > 0
    assert all(0 <= float(row[f"balls_found_{a}-{b}x"]) <= 1 for a, b in study.BANDS)
    (curve,) = list(csv.DictReader((out / "curves.csv").open()))
    assert curve["step"] == "2" and not math.isnan(float(curve["next_frame_mse"]))
    assert (out / "curves.png").exists() and (out / "balls.png").exists()
    metrics = out / "runs/size16/eval/step_2/metrics.json"
    evaluated = metrics.stat().st_mtime_ns
    study.main([*args, "--clips", "2", "--jobs", "1"])  # done: nothing is trained or evaluated again
    starts = (out / "runs/size16/runs.jsonl").read_text().splitlines()
    assert len(starts) == 2 and json.loads(starts[1])["step"] == 2
    assert metrics.stat().st_mtime_ns == evaluated
