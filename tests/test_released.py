"""Released causal Wan generators (`dforce.models.released`, `dforce export CHECKPOINT.pt`): toy weights
written in Self-Forcing's layout (Wan's original names behind the wrapper's `model.` prefix, in `generator`
and `generator_ema` entries of a `torch.save` dict) load bitwise as a dforce model, sample, and train on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from diffusers import WanTransformer3DModel
from test_roles import STUDENT
from test_text import encoder_dir, text_data  # noqa: F401 (fixtures)
from test_wan import TINY

from dforce.cli import main
from dforce.models.released import read_released
from dforce.models.wan import CausalWan
from dforce.training.checkpoint import WAN_NOISE, load_model
from dforce.training.config import load_config
from dforce.training.train import train

# diffusers' names -> Wan's original ones (the inverse of diffusers' own conversion), in order.
ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."),
    (".to_k.", ".k."), (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"), (".norm2.", ".norm__."), (".norm3.", ".norm2."), (".norm__.", ".norm3."),
]  # fmt: skip


def original_name(name: str) -> str:
    for new, old in ORIGINAL:
        name = name.replace(new, old)
    if name == "scale_shift_table":
        return "head.modulation"
    return re.sub(r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation", name)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """A pipeline root (transformer/ only) and a checkpoint in Self-Forcing's layout over its config: the
    EMA weights and other (noised) generator weights; both state dicts in diffusers' names."""
    torch.manual_seed(0)
    reference = WanTransformer3DModel(**TINY | {"in_channels": 3, "out_channels": 3})
    root = tmp_path_factory.mktemp("released")
    reference.save_pretrained(root / "wan/transformer")
    ema = {k: v.clone() for k, v in reference.state_dict().items()}
    raw = {k: v + 0.01 * torch.randn_like(v) for k, v in ema.items()}
    layout = {  # FSDP's wrapper prefix on the EMA, as a checkpoint saved under FSDP carries it
        "generator": {f"model.{original_name(k)}": v for k, v in raw.items()},
        "generator_ema": {f"model._fsdp_wrapped_module.{original_name(k)}": v for k, v in ema.items()},
    }
    torch.save(layout, root / "self_forcing_dmd.pt")
    return root / "wan", root / "self_forcing_dmd.pt", ema, raw


def test_a_released_generator_loads_bitwise(released, tmp_path):
    base, checkpoint, ema, raw = released
    for key, weights in ((None, ema), ("generator", raw)):
        state, read = read_released(checkpoint, key)
        assert read == (key or "generator_ema")
        assert state.keys() == weights.keys()
        assert all(torch.equal(state[k], v) for k, v in weights.items())
    out = tmp_path / "model"
    main(["export", str(checkpoint), "--base", str(base), "--num-frames", "4", "--frames-per-block", "2",
          "--sample-size", "8x8", "--out", str(out)])  # fmt: skip
    model, noise = load_model(out)
    assert isinstance(model, CausalWan) and noise == WAN_NOISE
    assert (model.horizon, model.frames_per_block, model.frame_shape) == (4, 2, (3, 8, 8))
    assert all(torch.equal(model.transformer.state_dict()[k], v) for k, v in ema.items())
    recipe = json.loads((out / "sampling.json").read_text())
    assert (recipe["sampler"], recipe["steps"], recipe["shift"]) == ("renoise", [1000, 750, 500, 250], 5.0)
    main(["sample", "--model", str(out), "--frames", "4", "--out", str(tmp_path / "sample.mp4")])
    assert (tmp_path / "sample.mp4").stat().st_size > 0


def test_a_released_generator_trains_on(released, tmp_path, text_data, encoder_dir):
    """Self-forcing continues the released generator (`self_forcing.generator`) against the bidirectional
    base it was distilled from."""
    base, checkpoint, ema, _ = released
    start = tmp_path / "start"
    main(["export", str(checkpoint), "--base", str(base), "--num-frames", "4", "--frames-per-block", "2",
          "--sample-size", "8x8", "--out", str(start)])  # fmt: skip
    negative = tmp_path / "negative.safetensors"
    main(["encode-text", "--prompt", "a ball", "--encoder", str(encoder_dir), "--out", str(negative),
          "--text-length", "8"])  # fmt: skip
    path = tmp_path / "student.yaml"
    path.write_text(STUDENT.format(out=tmp_path / "run", teacher=base, data=text_data[1], negative=negative))
    overrides = [f"self_forcing.generator={start}", "self_forcing.init=teacher", "train.max_steps=1"]
    overrides.append("train.lora=null")  # every weight trained, so that the generator's own change
    model, _ = load_model(train(load_config(path, overrides)))
    reset_accelerate()
    assert model.frames_per_block == 2
    trained = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    assert any(not torch.equal(trained[k].float(), v) for k, v in ema.items() if k in trained)


def test_checkpoints_that_are_not_weights_name_the_file(released, tmp_path):
    base, checkpoint, _, _ = released
    code = tmp_path / "code.pt"
    torch.save({"generator": {"model.x": torch.zeros(1)}, "hook": Path("/")}, code)  # a pickled object
    with pytest.raises(ValueError, match=r"code\.pt: not a checkpoint torch\.load reads as weights only"):
        read_released(code)
    partial = tmp_path / "partial.pt"
    state = torch.load(checkpoint, weights_only=True)["generator_ema"]
    torch.save({"generator_ema": {k: v for k, v in state.items() if "blocks.1." not in k}}, partial)
    with pytest.raises(
        SystemExit, match=r"partial\.pt: its weights are not a WanTransformer3DModel .* missing"
    ):
        main(["export", str(partial), "--base", str(base), "--num-frames", "4", "--frames-per-block", "2",
              "--sample-size", "8x8", "--out", str(tmp_path / "m")])  # fmt: skip
    with pytest.raises(ValueError, match=r"no entry 'student'"):
        read_released(checkpoint, "student")
