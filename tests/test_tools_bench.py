import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "tools/bench.py"


def bench(*argv: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_data_benchmark_prints_a_table_and_json():
    options = ["--sizes", "32", "--videos", "4", "--video-frames", "12", "--frames", "8", "--batch-size", "2"]
    figures = [json.loads(line) for line in bench("data", *options, "--repeat", "1", "--json").splitlines()]
    assert [f["figure"] for f in figures] == [
        "decord clips/s/worker",
        "loader clips/s/worker",
        "loader uint8 clips/s/worker",
        "loader overhead",
        "loader uint8 overhead",
    ]
    for figure in figures:
        assert {"value", "unit", "command", "machine", "torch", "date"} <= figure.keys()
        assert figure["size"] == "32x32" and figure["command"].startswith("tools/bench.py data --sizes 32")
    assert all(f["value"] > 0 for f in figures if f["unit"] == "clips/s")
    table = bench("data", *options, "--repeat", "1")
    assert "loader uint8 overhead" in table and "torch" in table.splitlines()[-1]


def test_model_benchmark_times_forward_and_backward():
    options = ["--shapes", "tiny", "--batch", "1", "--repeat", "1", "--no-yardstick", "--json"]
    figures = {f["figure"]: f for f in map(json.loads, bench("model", *options).splitlines())}
    assert list(figures) == [
        "parameters",
        "forward time",
        "forward TFLOP/s",
        "forward+backward time",
        "forward+backward TFLOP/s",
    ]
    assert 4 < figures["parameters"]["value"] < 6 and figures["parameters"]["tokens"] == 512
    assert figures["forward+backward time"]["value"] > figures["forward time"]["value"] > 0


def test_rollout_benchmark_times_cached_and_recomputed_frames():
    options = ["--at", "2", "6", "--batch", "1", "--steps", "1", "--measure", "1", "--repeat", "1"]
    figures = [
        json.loads(line) for line in bench("rollout", *options, "--horizons", "4", "7", "--json").splitlines()
    ]
    assert [(f["horizon"], f["figure"], f["mode"], f.get("frame")) for f in figures[:6]] == [
        (4, "time per frame", "cached", 2),
        (4, "time per frame", "cached", 6),
        (4, "frame 6 / frame 2", "cached", None),
        (4, "time per frame", "recompute", 2),
        (4, "time per frame", "recompute", 6),
        (4, "frame 6 / frame 2", "recompute", None),
    ]
    assert [f["horizon"] for f in figures[6:]] == [7] * 6
    assert all(f["value"] > 0 and f["batch"] == 1 and f["steps"] == 1 for f in figures)
    assert figures[2]["value"] == figures[1]["value"] / figures[0]["value"]
