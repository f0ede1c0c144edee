"""What makes the demo's model hold together: train variants of `configs/study.yaml` (the demo as it was
when the study began) on this machine and
score each on held-out clips, against CPU minutes.

    python tools/study.py --out outputs/study                       # every variant, 2 at a time
    python tools/study.py --out outputs/study --only base,patch4 --steps 1500 --jobs 1

Each variant is a list of dotted overrides of that config, trained with `dforce train` in its own
process (one thread, so that `--jobs` runs share the cores fairly), into OUT/runs/NAME; rerunning skips
finished runs and evaluations, and resumes killed ones. Every `--every` steps validation logs the held-out
next-frame error (sampled in 10 steps, and the one-step posterior mean) beside copying the last frame;
after training `dforce eval` rolls 32 held-out clips out 8x past the horizon from 4 real frames and finds
the balls by colour. Written to OUT: results.csv (one row per variant), curves.csv (one row per
validation), curves.png (error against CPU minutes) and balls.png (balls found by horizon multiple).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dforce.data.synthetic import RADIUS, SPEED, write_bouncing_balls
from dforce.evaluation.ablate import write_csv
from dforce.evaluation.plots import plot_curves
from dforce.evaluation.summary import BANDS, band_key

ROOT = Path(__file__).resolve().parents[1]
X0 = ["noise.parameterization=x0"]
MODEL16 = ["model.sample_size=16", "model.patch_size=4"]
SIZE16 = ["data.size=16", *MODEL16]  # 32x32 shards read at 16x16
CONTEXT_NOISE = ["loss.context_noise=200", "validation.context_noise=100"]


@dataclass(frozen=True)
class Variant:
    """One change to the reference: `overrides` of configs/study.yaml, `eval_args` of `dforce eval`; the
    `balls` per clip, their `speed` and `radius` ranges and the frame `size` of its own bouncing-balls
    shards (3 balls as they were at 32x32 use --data); and `model_of`: score that variant's model, on its
    data, instead of training one (sampler and step studies)."""

    what: str
    overrides: tuple[str, ...] = ()
    eval_args: tuple[str, ...] = ()
    balls: int = 3
    speed: tuple[float, float] = SPEED
    radius: tuple[float, float] = RADIUS
    size: int = 32
    model_of: str | None = None


VARIANTS: dict[str, Variant] = {
    "base": Variant("the demo as it is"),
    "patch4": Variant("16 tokens a side instead of 4 (patch 4)", ("model.patch_size=4",)),
    "size16": Variant(
        "frames at 16x16, patch 4: the same 4x4 tokens, a ball spans more of a patch", (*SIZE16,)
    ),
    "context_noise": Variant(
        "history seen at levels 0..200 in training, 100 at sampling (DF's stabilisation)",
        (*CONTEXT_NOISE,),
        ("--context-noise", "100"),
    ),
    "paths": Variant(
        "per-frame independent levels along uniform paths instead of the staircase",
        ("trajectory.name=paths",),
    ),
    "x0": Variant("x0-prediction instead of v", (*X0,)),
    "x0_size16": Variant("x0-prediction on 16x16 frames, patch 4", (*X0, *SIZE16)),
    "lr5e-4": Variant("a quarter of the learning rate", ("train.lr=5e-4",)),
    "ema0.999": Variant("a slower EMA", ("train.ema_decay=0.999",)),
    "x0_context_noise": Variant(
        "x0, history at levels 0..200 in training, 100 at sampling",
        (*X0, *CONTEXT_NOISE),
        ("--context-noise", "100"),
    ),
    "x0_paths": Variant(
        "x0 under per-frame levels along uniform paths, half the learning rate",
        (*X0, "trajectory.name=paths", "train.lr=1e-3"),
    ),
    "x0_balls2": Variant("x0 on clips of 2 balls", (*X0,), balls=2),
    "x0_balls1": Variant("x0 on clips of 1 ball", (*X0,), balls=1),
    "x0_balls1_hg1.5": Variant(
        "the x0_balls1 model sampled with history guidance 1.5",
        eval_args=("--history-guidance", "1.5"),
        model_of="x0_balls1",
    ),
    "x0_balls1_fast": Variant("x0 on 1 ball moving twice as fast", (*X0,), balls=1, speed=(0.06, 0.12)),
    "x0_balls1_fast_hg1.5": Variant(
        "the x0_balls1_fast model sampled with history guidance 1.5",
        eval_args=("--history-guidance", "1.5"),
        model_of="x0_balls1_fast",
    ),
    "x0_balls1_context_noise": Variant(
        "x0 on 1 ball, history at levels 0..200 in training, 100 at sampling",
        (*X0, *CONTEXT_NOISE),
        ("--context-noise", "100"),
        balls=1,
    ),
    "x0_balls1_context_noise_hg1.5": Variant(
        "the x0_balls1_context_noise model sampled with history guidance 1.5",
        eval_args=("--context-noise", "100", "--history-guidance", "1.5"),
        model_of="x0_balls1_context_noise",
    ),
    "x0_balls1_size16": Variant(
        "x0 on 1 ball at 16x16, patch 4 (a ball spans more of a token's pixels)",
        (*X0, *MODEL16),
        balls=1,
        size=16,
    ),
    **{
        f"x0_balls1_size16_hg{g}": Variant(
            f"the x0_balls1_size16 model sampled with history guidance {g}",
            eval_args=("--history-guidance", g),
            model_of="x0_balls1_size16",
        )
        for g in ("1.25", "1.5", "2")
    },
    "x0_balls1_size16_big": Variant(
        "x0_balls1_size16 with larger balls (radius 0.15-0.22 frame sides instead of 0.08-0.14)",
        (*X0, *MODEL16),
        balls=1,
        size=16,
        radius=(0.15, 0.22),
    ),
    "x0_balls1_size16_big_hg1.5": Variant(
        "the x0_balls1_size16_big model sampled with history guidance 1.5",
        eval_args=("--history-guidance", "1.5"),
        model_of="x0_balls1_size16_big",
    ),
    "x0_ddpm": Variant(
        "the x0 model sampled with DDPM (fresh noise each step)",
        eval_args=("--sampler", "ddpm"),
        model_of="x0",
    ),
    "x0_steps50": Variant(
        "the x0 model sampled in 50 DDIM steps", eval_args=("--steps", "50"), model_of="x0"
    ),
}


def train(name: str, overrides: list[str], out: Path, data: Path, steps: int, every: int) -> float:
    """`dforce train` of one variant in a child process with one thread; -> the CPU seconds of this call
    (a resumed run adds to those recorded in RUN/cpu_s.json, a finished one adds its start-up only)."""
    run = out / "runs" / name
    args = [
        *overrides,
        f"output_dir={run}",
        f"data.shards={data}/train-*.tar",
        f"validation.shards={data}/val-*.tar",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={every}",
        f"validation.every={every}",
        "data.num_workers=0",
        "train.trackers=[tensorboard]",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dforce", "train", str(ROOT / "configs/study.yaml"), *args]
    with (out / "logs" / f"{name}.log").open("a") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time, whatever else runs
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"study: training {name} failed; see {out / 'logs' / name}.log")
    cpu_s = usage.ru_utime + usage.ru_stime
    stamp = run / "cpu_s.json"
    total = cpu_s + (json.loads(stamp.read_text())["cpu_s"] if stamp.exists() else 0.0)
    stamp.write_text(json.dumps({"cpu_s": total}) + "\n")
    return cpu_s


def shards(variant: Variant, out: Path, data: Path) -> Path:
    """The variant's shards: --data for 3 balls as they were at 32x32, else made once in OUT/data/NAME
    (1024 training clips of 32 frames, 64 held-out clips of 64), NAME from what differs."""
    variant = VARIANTS[variant.model_of] if variant.model_of else variant
    options = {
        "size": variant.size,
        "num_balls": variant.balls,
        "speed": variant.speed,
        "radius": variant.radius,
    }
    if options == {"size": 32, "num_balls": 3, "speed": SPEED, "radius": RADIUS}:
        made = data
    else:
        name = f"balls{variant.balls}" + ("" if variant.speed == SPEED else "_{}-{}".format(*variant.speed))
        name += "" if variant.radius == RADIUS else "_r{}-{}".format(*variant.radius)
        made = out / "data" / (name + ("" if variant.size == 32 else f"_size{variant.size}"))
    if not (made / "val-000000.tar").exists():
        write_bouncing_balls(made, num_clips=1024, frames=32, seed=0, overwrite=True, **options)
        write_bouncing_balls(made, num_clips=64, frames=64, seed=1, prefix="val", **options)
    return made


def evaluate(name: str, out: Path, data: Path, clips: int, steps: int) -> dict:
    """`dforce eval` of the variant's model after `steps` steps, 8x past its horizon; cached in
    RUN/eval/step_N, or RUN/eval/NAME/step_N for a variant scoring another's model (a run trained on to
    more steps is evaluated again)."""
    variant = VARIANTS[name]
    run = out / "runs" / (variant.model_of or name)
    target = run / "eval" / (name if variant.model_of else "") / f"step_{steps}"
    saved = target / "metrics.json"
    if not saved.exists() or "balls_found_0-1x" not in json.loads(saved.read_text())["summary"]:
        horizon = json.loads((run / "model" / "config.json").read_text())["num_frames"]
        command = [
            sys.executable, "-m", "dforce", "eval", "--model", str(run / "model"), "--data",
            f"{data}/val-*.tar", "--clips", str(clips), "--context-frames", "4",
            "--frames", str(8 * horizon - 4), "--steps", "10", "--elbo-draws", "0", "--out", str(target),
            *variant.eval_args,
        ]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((target / "metrics.json").read_text())


def balls_by_band(result: dict) -> dict[str, float]:
    """The share of generated frames with every ball found, per horizon-multiple band."""
    keys = [band_key("balls_found", low, high) for low, high in BANDS]
    return {key: result["summary"].get(key, math.nan) for key in keys}


def curves(name: str, out: Path, cpu_min_per_step: float) -> list[dict]:
    """The validation scalars of a run's TensorBoard log, one row per validation step."""
    rows = {}
    for events in sorted((out / "runs" / name / "logs").rglob("events.out.tfevents.*")):
        logged = EventAccumulator(str(events))
        logged.Reload()
        tags = [t for t in logged.Tags()["scalars"] if t.startswith("val/")]
        for tag in tags:
            for event in logged.Scalars(tag):
                rows.setdefault(event.step, {"variant": name, "step": event.step})[tag[4:]] = event.value
    for row in rows.values():
        row["cpu_min"] = row["step"] * cpu_min_per_step
    return [rows[step] for step in sorted(rows)]


def study(out: Path, names: list[str], data: Path, steps: int, every: int, jobs: int, clips: int) -> None:
    (out / "logs").mkdir(parents=True, exist_ok=True)
    spent = {}

    def run(name: str) -> None:
        variant = VARIANTS[name]
        spent[name] = train(name, list(variant.overrides), out, shards(variant, out, data), steps, every)
        print(f"study: {name} trained ({spent[name] / 60:.1f} CPU minutes this call)", flush=True)

    trained = list(dict.fromkeys(VARIANTS[n].model_of or n for n in names))
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(run, trained))
    rows, curve_rows = [], []
    for name in names:
        variant = VARIANTS[name]
        result = evaluate(name, out, shards(variant, out, data), clips, steps)
        cpu_min = cpu_minutes(out, variant.model_of or name)
        rows.append({
            "variant": name, "changes": variant.what, "steps": steps, "train_cpu_min": cpu_min,
            **{k: result["summary"][k] for k in ("mse_in_horizon", "mse_past_horizon")},
            **balls_by_band(result),
        })  # fmt: skip
        if not variant.model_of:
            curve_rows += curves(name, out, cpu_min / steps if cpu_min else math.nan)
    write_csv(out / "results.csv", rows)
    write_csv(out / "curves.csv", curve_rows)
    metrics = {
        "sampled next frame (MSE)": "next_frame_mse",
        "posterior mean next frame (MSE)": "next_frame_mse_1step",
    }
    curved = [n for n in names if not VARIANTS[n].model_of]
    panels = {
        title: {n: ([r["cpu_min"] for r in curve_rows if r["variant"] == n],
                    [r.get(key, math.nan) for r in curve_rows if r["variant"] == n], None) for n in curved}
        for title, key in metrics.items()
    }  # fmt: skip
    copy = [r.get("copy_last_frame_mse", math.nan) for r in curve_rows if r["variant"] == curved[0]]
    panels["sampled next frame (MSE)"]["copy last frame"] = (
        [r["cpu_min"] for r in curve_rows if r["variant"] == curved[0]], copy, None,
    )  # fmt: skip
    plot_curves(panels, out / "curves.png", "training CPU minutes (one thread)")
    bands = list(range(len(BANDS)))
    keys = [band_key("balls_found", low, high) for low, high in BANDS]
    balls = {
        "frames with every ball found": {r["variant"]: (bands, [r[k] for k in keys], None) for r in rows}
    }
    plot_curves(balls, out / "balls.png", "horizon band: 0-1x, 1-2x, 2-4x, 4-8x")
    print(f"study: {len(names)} variants, {sum(spent.values()) / 60:.1f} CPU minutes this call; wrote {out}")


def cpu_minutes(out: Path, name: str) -> float:
    """Training CPU minutes of a run, all its calls together (RUN/cpu_s.json)."""
    stamp = out / "runs" / name / "cpu_s.json"
    return json.loads(stamp.read_text())["cpu_s"] / 60 if stamp.exists() else math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/study")
    parser.add_argument(
        "--data", default="outputs/study/data/balls3", help="3-ball 32x32 shards (made there if missing)"
    )
    parser.add_argument(
        "--only", default=",".join(VARIANTS), help=f"comma-separated of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250, help="steps between validations")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--clips", type=int, default=32, help="held-out clips rolled out per variant")
    args = parser.parse_args(argv)
    names = args.only.split(",")
    if unknown := sorted(set(names) - set(VARIANTS)):
        sys.exit(f"study: unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    data = Path(args.data).resolve()  # runs record absolute paths, so a rerun from elsewhere matches them
    study(Path(args.out).resolve(), names, data, args.steps, args.every, args.jobs, args.clips)


if __name__ == "__main__":
    main()
