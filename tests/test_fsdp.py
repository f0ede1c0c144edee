"""configs/accelerate/fsdp.yaml on two CPU processes: training, validation (every rank rolls out),
export and resume with FSDP2-sharded weights and EMA give the weights data-parallel training gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import shipped_fsdp_policy
from safetensors.torch import load_file

from dforce.data.synthetic import write_bouncing_balls
from dforce.models.lora import LORA_FILE
from dforce.models.model import CausalVideoTransformer

ROOT = Path(__file__).parent.parent
CONFIG = """\
output_dir: {out}
seed: 0
train: {{max_steps: 6, checkpoint_every: 2, batch_size: 2, log_every: 2, lr: 2e-3, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
noise: {{levels: 50}}
model: {{sample_size: 16, patch_size: 4, num_layers: 2, num_attention_heads: 2, attention_head_dim: 16}}
validation: {{shards: "{data}/val-*.tar", every: 4, batches: 1, weightings: [paths], rollout_clips: 1,
             context_frames: 2, rollout_frames: 4, sampling_steps: 2}}
"""

# Accelerate applies an FSDP config only to GPU-like process groups; the spy lets it take a CPU group
# of gloo processes, and records how each rank holds its weights at every export.
SPY = """\
import json
import os
import sys
from pathlib import Path

if os.environ.get("ACCELERATE_USE_FSDP") == "true":
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU

import dforce.training.trainer as train
from torch.distributed.tensor import DTensor

out = Path(sys.argv.pop(1))
export_model = train.export_model


def spy_export(accelerator, model, ema, config, directory, *rest):
    params, shadows = list(model.parameters()), ema.shadow_params
    record = {
        "type": str(accelerator.distributed_type),
        "sharded": all(isinstance(p, DTensor) for p in params + shadows),
        "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "total": sum(p.numel() for p in params),
        "models sharded": [all(isinstance(p, DTensor) for p in m.parameters()) for m in accelerator._models],
    }
    with open(out / f"exports_{accelerator.process_index}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\\n")
    export_model(accelerator, model, ema, config, directory, *rest)


train.export_model = spy_export
from dforce.cli import main

main()
"""


def launch(
    tmp_path: Path, run: str, port: int, *launcher: str, steps: int, text: str = CONFIG, **fields: object
) -> subprocess.CompletedProcess:
    config = tmp_path / f"{run}.yaml"
    config.write_text(text.format(out=tmp_path / run, data=tmp_path / "data", **fields))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
        "--dynamo_backend", "no", str(tmp_path / "spy.py"), str(tmp_path / run), "train", str(config),
        f"train.max_steps={steps}",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fsdp_trains_exports_and_resumes_as_data_parallel(tmp_path):
    write_bouncing_balls(tmp_path / "data", num_clips=16, frames=8, size=16, num_balls=2, seed=0, maxcount=8)
    write_bouncing_balls(tmp_path / "data", num_clips=4, frames=8, size=16, num_balls=2, seed=1, prefix="val")
    (tmp_path / "spy.py").write_text(textwrap.dedent(SPY))
    fsdp = ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml")]
    for run in "fsdp", "ddp":
        (tmp_path / run).mkdir()
    launch(tmp_path, "fsdp", 29531, *fsdp, steps=4)
    resumed = launch(tmp_path, "fsdp", 29532, *fsdp, steps=6)
    assert (
        "resumed from" in resumed.stdout + resumed.stderr and "at step 4" in resumed.stdout + resumed.stderr
    )
    launch(tmp_path, "ddp", 29533, "--multi_gpu", steps=6)
    assert sorted(p.name for p in (tmp_path / "fsdp/samples").glob("*.mp4")) == [
        "step_00000004.mp4",
        "step_00000006.mp4",
    ]

    for rank in 0, 1:
        records = [
            json.loads(line) for line in (tmp_path / f"fsdp/exports_{rank}.jsonl").read_text().splitlines()
        ]
        assert len(records) == 3  # steps 2 and 4, then 6 after the resume
        for record in records:
            assert record["type"] == "DistributedType.FSDP" and record["sharded"]
            assert record["local"] < record["total"]  # each rank holds a part of the weights
        ddp = json.loads((tmp_path / f"ddp/exports_{rank}.jsonl").read_text().splitlines()[0])
        assert ddp["type"] == "DistributedType.MULTI_CPU" and not ddp["sharded"]

    # The exported EMA weights after 6 steps: the sharded run, resumed from step 4, equals the plain one.
    sharded, plain = (
        load_file(tmp_path / run / "model/diffusion_pytorch_model.safetensors") for run in ("fsdp", "ddp")
    )
    assert sharded.keys() == plain.keys()
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)
    assert any(
        not torch.equal(plain[key], torch.zeros_like(plain[key])) for key in plain if "modulation" in key
    )


def test_the_shipped_config_wraps_each_block(monkeypatch):
    """configs/accelerate/fsdp.yaml names no class: the auto-wrap policy takes the model's own blocks
    (`_no_split_modules`; test_wan.py checks Wan's)."""
    model = CausalVideoTransformer(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8)
    policy = shipped_fsdp_policy(model, monkeypatch)
    assert [name for name, module in model.named_modules() if policy(module)] == ["blocks.0", "blocks.1"]


SELF_FORCING = """\
output_dir: {out}
seed: 0
objective: self_forcing
self_forcing: {{teacher: "{teacher}", steps: 2, context_frames: 2, rollout_frames: 6, critic_steps: 2,
               critic_lr: 1e-3, min_level: 2, max_level: 48}}
train: {{max_steps: 4, checkpoint_every: 2, batch_size: 2, log_every: 2, lr: 1e-3, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
"""


@pytest.mark.parametrize("lora", [False, True])
def test_self_forcing_under_fsdp_is_data_parallel_and_resumes(tmp_path, lora):
    """configs/accelerate/fsdp.yaml runs self-forcing: the generator and the critic prepared one a call and
    sharded, the frozen teacher sharded without an optimiser; under LoRA each role shards its own copy of
    the frozen base (not yet one copy shared). Killed after step 2 and rerun, its exported generator (its
    adapters under LoRA) after 4 steps equals the data-parallel run's within rounding (atol 1e-5, rtol
    1e-4)."""
    write_bouncing_balls(tmp_path / "data", num_clips=16, frames=8, size=16, num_balls=2, seed=0, maxcount=8)
    write_bouncing_balls(tmp_path / "data", num_clips=4, frames=8, size=16, num_balls=2, seed=1, prefix="val")
    (tmp_path / "spy.py").write_text(textwrap.dedent(SPY))
    teacher = tmp_path / "teacher"
    (tmp_path / "teacher_run").mkdir()
    launch(tmp_path, "teacher_run", 29541 + 10 * lora, "--multi_gpu", steps=2)
    (tmp_path / "teacher_run/model").rename(teacher)
    fsdp = ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml")]
    for run in "fsdp", "ddp":
        (tmp_path / run).mkdir()
    text = (
        SELF_FORCING.replace("trackers: []}}", "trackers: [], lora: {{rank: 4}}}}") if lora else SELF_FORCING
    )
    options = {"text": text, "teacher": teacher}
    launch(tmp_path, "fsdp", 29542 + 10 * lora, *fsdp, steps=2, **options)
    resumed = launch(tmp_path, "fsdp", 29543 + 10 * lora, *fsdp, steps=4, **options)
    assert "resumed from" in resumed.stdout + resumed.stderr
    launch(tmp_path, "ddp", 29544 + 10 * lora, "--multi_gpu", steps=4, **options)
    for rank in 0, 1:
        record = json.loads((tmp_path / f"fsdp/exports_{rank}.jsonl").read_text().splitlines()[-1])
        assert record["sharded"] and record["local"] < record["total"]
        assert record["models sharded"] == [True, True, True]  # generator, critic, teacher
    name = LORA_FILE if lora else "diffusion_pytorch_model.safetensors"
    sharded, plain = (load_file(tmp_path / run / "model" / name) for run in ("fsdp", "ddp"))
    assert any(value.abs().max() > 0 for value in plain.values())  # the generator (its adapters) trained
    for key in plain:
        torch.testing.assert_close(sharded[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)
