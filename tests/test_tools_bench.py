import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

from dforce.models.model import CausalVideoTransformer
from dforce.models.wan import CausalWan

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


TINY = [
    "--model",
    "num_layers=2",
    "attention_head_dim=16",
    "sample_size=16",
    "--batch",
    "2",
    "--threads",
    "1",
]


def test_train_benchmark_sets_the_step_beside_the_yardstick():
    figures = {
        f["figure"]: f
        for f in map(
            json.loads, bench("train", *TINY, "--steps", "1", "--repeat", "1", "--json").splitlines()
        )
    }
    assert list(figures)[:5] == [
        "parameters",
        "step time",
        "forward+backward time",
        "step beyond forward+backward",
        "step useful TFLOP/s",
    ]
    if not (BENCH.resolve().parents[1].parent / "shared/bench/yardstick.py").exists():  # a bare clone
        assert figures["yardstick"]["value"] == "absent" and not any("yardstick best" in f for f in figures)
        return
    assert figures["yardstick flex"]["value"] == "failed"  # no flex backward on a CPU
    best = max(
        (f for name, f in figures.items() if name.startswith("yardstick") and f["unit"] == "TFLOP/s"),
        key=lambda f: f["value"],
    )
    variant = best["figure"].removeprefix("yardstick ").removesuffix(" TFLOP/s")
    ratio = figures[f"step / yardstick best ({variant})"]
    assert ratio["value"] == figures["step useful TFLOP/s"]["value"] / best["value"]
    assert figures["step time"]["value"] > 0 and figures["parameters"]["batch"] == 2
    assert all(f["command"].startswith("tools/bench.py train --model") for f in figures.values())


def test_train_flops_are_counted_as_the_yardstick_counts_them():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = CausalVideoTransformer(
        in_channels=3, sample_size=32, patch_size=4, num_frames=8,
        num_layers=4, num_attention_heads=4, attention_head_dim=64,
    )  # fmt: skip
    d, tokens, frames = 256, 512, 8
    linear = 2 * 4 * tokens * 4 * (3 + 1 + 8 + 6) * d * d
    attention = 4 * 4 * 4 * tokens * tokens * d * (frames + 1) / (2 * frames)
    assert module.useful_flops(model, batch=4) == linear + attention


def test_wan_flops_count_its_own_linears():
    """Wan's block: self-attention 4 d^2, cross-attention's query and output 2 d^2, FFN 2 d ffn_dim, and the
    adaLN modulation's 6 d^2 per token that the yardstick counts (and ours is credited with), though both
    backbones compute it once per frame."""
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = dict(in_channels=3, sample_size=32, patch_size=4, num_layers=4, num_attention_heads=4,
                 attention_head_dim=64)  # fmt: skip
    section = module.wan_section(shape)
    model = CausalWan(transformer_config=section["config"], num_frames=8, sample_size=(32, 32))
    d, tokens, frames = 256, 512, 8
    linear = 2 * 4 * tokens * 4 * (6 + 8 + 6) * d * d
    attention = 4 * 4 * 4 * tokens * tokens * d * (frames + 1) / (2 * frames)
    assert module.useful_flops(model, batch=4) == linear + attention


def test_train_and_rollout_benchmarks_take_the_wan_backbone():
    options = ["--backbone", "wan", *TINY, "--steps", "1", "--repeat", "1", "--no-yardstick", "--json"]
    figures = [json.loads(line) for line in bench("train", *options).splitlines()]
    assert [f["figure"] for f in figures][:2] == ["parameters", "step time"]
    assert all(f["backbone"] == "wan" for f in figures) and figures[1]["value"] > 0
    options = ["--at", "2", "3", "--batch", "1", "--steps", "1", "--measure", "1", "--repeat", "1"]
    figures = [
        json.loads(line)
        for line in bench("rollout", "--backbone", "wan", *options, "--horizons", "4", "--json").splitlines()
    ]
    assert len(figures) == 6 and all(f["backbone"] == "wan" and f["value"] > 0 for f in figures)


def test_memory_benchmark_checkpointing_lowers_the_peak():
    figures = [json.loads(line) for line in bench("memory", *TINY, "--json").splitlines()]
    plain, checkpointed, ratio, saved, per_d = figures
    assert (plain["checkpointing"], checkpointed["checkpointing"]) == (False, True)
    assert 0 < checkpointed["value"] < plain["value"] and plain["unit"] == "MiB"
    assert ratio["value"] == checkpointed["value"] / plain["value"]
    # fp32 activations per token and layer: the residual stream, q, k, v, the MLP's 4d, ... (~26 floats of d)
    assert per_d["unit"] == "bytes/d" and 60 < per_d["value"] < 160 and per_d["d"] == 64
    assert saved["unit"] == "bytes" and saved["value"] == per_d["value"] * 64


def test_memory_benchmark_takes_the_wan_backbone_and_lora():
    """Wan's activations per token and layer grow with its FFN width (the GELU's input and output), and
    adapters over a frozen base keep fewer (no weight gradients to save inputs for)."""
    shape = ["num_layers=2", "attention_head_dim=16", "sample_size=16"]
    wan = ["--backbone", "wan", "--batch", "2", "--threads", "1", "--json"]
    per_token = {}
    for options in (
        ["--model", *shape],
        ["--model", *shape, "ffn_dim=512"],
        ["--lora", "4", "--model", *shape],
    ):
        *_, saved, per_d = [json.loads(line) for line in bench("memory", *wan, *options).splitlines()]
        assert per_d["backbone"] == "wan" and per_d["d"] == 64
        per_token[tuple(options)] = (saved["value"], saved["ffn"], saved["lora"])
    plain, wide, lora = per_token.values()
    assert plain[1:] == (256, "no") and wide[1:] == (512, "no") and lora[1:] == (256, 4)
    assert wide[0] > plain[0] > lora[0] > 0


def test_scale_table_reproduces_its_arithmetic():
    """`scale`: parameters on the meta device (ours as BENCHMARKS.md's table; Wan 2.1 1.3B and 14B from their
    published configs), 20 bytes a trained weight sharded, and the activation arithmetic."""
    rows = [json.loads(line) for line in bench("scale", "--lora-ranks", "8", "32", "--json").splitlines()]
    by = {(r["model"], r["frames"], r["lora"]): r for r in rows}
    ours = by[("ours ~1B", 16, "no")]
    assert round(ours["params M"]) == 1027 and math.isclose(ours["value"], 11.71, abs_tol=0.01)
    wan = by[("Wan2.1 1.3B", 21, "no")]
    assert round(wan["params M"]) == 1419 and wan["tokens/frame"] == 1560
    assert math.isclose(wan["state GiB"], 20 * wan["params M"] * 1e6 / 8 / 2**30)
    tokens, d, layers = 21 * 1560, 1536, 30
    plain = tokens * layers * (100 * d + 4 * 8960) + tokens * 12 * d
    assert math.isclose(wan["act plain GiB"], plain / 2**30)
    checkpointed = tokens * layers * 2 * d + tokens * (100 * d + 4 * 8960) + tokens * 12 * d
    assert math.isclose(wan["act ckpt GiB"], checkpointed / 2**30)
    assert round(by[("Wan2.1 1.3B", 21, 8)]["trainable M"], 1) == 10.9
    assert round(by[("Wan2.1 1.3B", 21, 32)]["trainable M"], 1) == 43.7
    assert round(by[("Wan2.1 14B", 21, "no")]["params M"] / 1e3, 1) == 14.3
    assert round(by[("Wan2.1 14B", 21, 8)]["trainable M"], 1) == 38.3
    assert round(by[("Wan2.1 14B", 21, 32)]["trainable M"]) == 153


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


def test_vae_benchmark_encodes_decodes_and_measures_memory_per_length():
    options = ["--size", "16", "--clips", "2", "--frames", "5", "--lengths", "2", "3", "--repeat", "1"]
    figures = [json.loads(line) for line in bench("vae", *options, "--threads", "1", "--json").splitlines()]
    for kind, lengths in ("kl", [(2, 2), (3, 3)]), ("wan", [(2, 5), (3, 9)]):  # (latents, pixel frames)
        mine = {f["figure"]: f for f in figures if f["kind"] == kind}
        assert list(mine)[:6] == [
            "encode pipeline clips/s",
            "encode VAE alone clips/s",
            "encode pipeline / VAE alone",
            "decode dforce ms/frame",
            "decode direct ms/frame",
            "decode dforce / direct",
        ]
        assert all(mine[f"encode {name} clips/s"]["value"] > 0 for name in ("pipeline", "VAE alone"))
        encoded = mine["encode VAE alone clips/s"]["value"] / mine["encode pipeline clips/s"]["value"]
        assert math.isclose(mine["encode pipeline / VAE alone"]["value"], encoded)
        assert 0 < mine["decode dforce ms/frame"]["value"] < math.inf
        assert 0 < mine["decode direct ms/frame"]["value"] < math.inf
        decoded = mine["decode dforce ms/frame"]["value"] / mine["decode direct ms/frame"]["value"]
        assert math.isclose(mine["decode dforce / direct"]["value"], decoded)
        assert mine["encode pipeline clips/s"]["frames"] == 5
        assert mine["decode dforce / direct"]["frames"] == 10  # the first two clips' latents, decoded
        memory = [f for f in figures if f["kind"] == kind and f["figure"] == "decode peak above output"]
        assert [(f["latent_frames"], f["pixel_frames"]) for f in memory] == lengths
        for f in memory:
            assert 0 < f["value"] < f["peak MiB"] and f["unit"] == "MiB"
            assert math.isclose(f["peak MiB"] - f["output MiB"], f["value"])
            assert math.isclose(f["output MiB"] * 2**20, f["pixel_frames"] * 3 * 16 * 16 * 4)
        ratio = mine["peak above output, 3 / 2 latents"]["value"]
        assert math.isfinite(ratio) and math.isclose(ratio, memory[1]["value"] / memory[0]["value"])
    assert {f["vae"] for f in figures} == {"AutoencoderKL", "AutoencoderKLWan"}
    assert all({"command", "machine", "torch", "date", "size", "device"} <= f.keys() for f in figures)
    assert figures[0]["size"] == "16x16" and figures[0]["command"].startswith("tools/bench.py vae --size 16")
