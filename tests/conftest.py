"""Small videos and shards made on the spot for the data tests (nothing is downloaded), and for the
training tests a tiny config on bouncing-balls shards, a fresh Accelerate state and a two-process
launcher."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from dforce.data.shards import ShardSink, encode_video
from dforce.data.synthetic import write_bouncing_balls

ROOT = Path(__file__).parent.parent
CONTAINERS = {".mp4": ("mp4", "libx264"), ".mkv": ("matroska", "libx264"), ".webm": ("webm", "libvpx-vp9")}


def pattern(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 `[T, H, W, 3]`: a drifting colour gradient with a bright square moving across (codes well)."""
    t = np.arange(frames)[:, None, None]
    y, x = np.mgrid[:height, :width][:, None] / max(height, width)  # [1, H, W] each
    video = np.stack(
        [40 + 150 * x + 3 * t + seed * 10, 40 + 150 * y + 0 * t, 200 - 120 * x * y - 2 * t + 0 * y], axis=-1
    )  # [T, H, W, 3]
    for i in range(frames):
        top, left = (i + seed) % (height - 4), (2 * i + seed) % (width - 4)
        video[i, top : top + 4, left : left + 4] = 250
    return np.clip(video, 0, 255).astype(np.uint8)


def write_video(path: Path, video: np.ndarray, fps: float = 8) -> None:
    """Encode `video` into the container its suffix names (mp4/mkv: H.264 4:4:4, webm: VP9)."""
    if path.suffix == ".mp4":
        path.write_bytes(encode_video(video, fps, crf=4))
        return
    container_format, codec = CONTAINERS[path.suffix]
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        stream.options = {"crf": "4"} if codec == "libx264" else {}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> SimpleNamespace:
    """A folder of 5 good videos (12 frames of 16x32, three containers, one in a subfolder; e.mp4 16x24,
    a width decord mis-reads), a sidecar, and three bad files: random bytes, empty, 2 frames."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    sources = {}
    for i, (name, height, width) in enumerate(
        [("a.mp4", 16, 32), ("b.mp4", 16, 32), ("c.mkv", 16, 32), ("sub/d.webm", 16, 32), ("e.mp4", 16, 24)]
    ):
        sources[root / name] = pattern(12, height, width, seed=i)
        write_video(root / name, sources[root / name])
    (root / "a.json").write_text(json.dumps({"label": 2, "actions": [[i, -i] for i in range(12)]}))
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "empty.mp4").write_bytes(b"")
    write_video(root / "short.mp4", pattern(2, 16, 16))
    return SimpleNamespace(root=root, sources=sources, good=sorted(sources), bad=["broken", "empty", "short"])


def write_index_shards(out: Path, shards: int, per_shard: int, frames: int = 8) -> list[str]:
    """Shards of 8x32 videos whose json `actions` hold each frame's index and `label` the sample's number."""
    video = encode_video(pattern(frames, 8, 32), fps=8, crf=30)
    with ShardSink(out, maxcount=per_shard) as sink:
        for n in range(shards * per_shard):
            actions = [[i] for i in range(frames)]
            sink.write({"__key__": f"s{n:05d}", "mp4": video, "json": {"label": n, "actions": actions}})
    return sink.shards


@pytest.fixture(scope="session")
def index_shards(tmp_path_factory) -> list[str]:
    """8 shards x 3 samples of 8x32 videos, 8 frames each."""
    return write_index_shards(tmp_path_factory.mktemp("index_shards"), shards=8, per_shard=3)


def reset_accelerate() -> None:
    """Accelerate keeps its state in process-wide singletons: each in-process run must start afresh."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    yield
    reset_accelerate()


def shipped_fsdp_policy(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> Callable:
    """The FSDP2 auto-wrap policy that `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives
    `model`: the yaml read by Accelerate's launcher into its environment, the plugin made from that."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = str(ROOT / "configs/accelerate/fsdp.yaml")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", config, "x"]))
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    return fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)


def launch_two_processes(
    script: Path, *args: str, port: int, mixed_precision: str = "no"
) -> subprocess.CompletedProcess:
    """The two-CPU-process command of docs/training.md: `accelerate launch` of `script`, two ranks over
    gloo."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--num_processes", "2", "--main_process_port", str(port), "--mixed_precision", mixed_precision,
        "--dynamo_backend", "no", str(script), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


CONFIG = """\
output_dir: {out}
seed: 0
train: {{max_steps: 12, checkpoint_every: 4, batch_size: 2, log_every: 4, lr: 2e-3, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
noise: {{levels: 50}}
model: {{sample_size: 16, patch_size: 4, num_layers: 2, num_attention_heads: 2, attention_head_dim: 16}}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("balls")
    write_bouncing_balls(out, num_clips=16, frames=8, size=16, num_balls=2, seed=0, maxcount=8)
    write_bouncing_balls(out, num_clips=4, frames=12, size=16, num_balls=2, seed=1, prefix="val")
    return out


@pytest.fixture
def config_file(tmp_path, data) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", data=data))
    return path


class Terminal(io.StringIO):
    """A stream that says it is a terminal: where dforce draws progress bars."""

    def isatty(self) -> bool:
        return True
