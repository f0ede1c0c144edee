"""LoRA (`train.lora`): only the adapters train, a resumed run is the uninterrupted one bit for bit, the
exported adapters load through diffusers' own LoRA reader, `dforce export --merge-lora` gives a plain model
of the same outputs, self-forcing trains adapters over one copy of the teacher, bad keys are named, and the
same holds for diffusers' Wan transformer, plain and as the wan backbone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from diffusers import WanTransformer3DModel
from diffusers.loaders import WanLoraLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dforce.cli import main
from dforce.diffusion.noise import NoiseConfig
from dforce.models.backbone import build_model
from dforce.models.lora import LORA_FILE, LoraConfig, add_lora, has_lora, merge_lora, share_base
from dforce.models.model import CausalVideoTransformer
from dforce.models.wan import CausalWan
from dforce.training.checkpoint import load_model, write_model
from dforce.training.config import ConfigError, load_config
from dforce.training.engine import hold_frozen
from dforce.training.objectives.self_forcing import SelfForcingObjective
from dforce.training.run_record import RunMismatch, plan_start
from dforce.training.train import train
from dforce.training.trainer import Trainer

MODEL = {
    "sample_size": 16,
    "patch_size": 4,
    "num_layers": 2,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
}
# A model trained from scratch starts as the zero function (adaLN-Zero, a zero output layer): adapters on
# the attention and MLP alone get no gradient until the modulations and the output layer move too.
LORA = "{rank: 4, alpha: 8, target_modules: [qkv, proj, mlp.net.2, modulation, proj_out]}"
CONFIG = """\
output_dir: {out}
seed: 0
train: {{max_steps: 8, checkpoint_every: 4, batch_size: 2, log_every: 4, lr: 2e-3, ema_decay: 0.9,
        trackers: [], lora: {lora}}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
noise: {{levels: 50}}
model: {{sample_size: 16, patch_size: 4, num_layers: 2, num_attention_heads: 2, attention_head_dim: 16}}
"""


def write_config(path: Path, data: Path, out: Path, lora: str = LORA) -> Path:
    path.write_text(CONFIG.format(out=out, data=data, lora=lora))
    return path


def base_model(seed: int = 0) -> CausalVideoTransformer:
    """The model a run of CONFIG starts from (`Denoising` seeds before it builds)."""
    torch.manual_seed(seed)
    return CausalVideoTransformer(num_frames=4, **MODEL)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 3, 16, 16, generator=generator), torch.randint(
        0, 50, (2, 4), generator=generator
    )


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs())


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """A LoRA run of 8 steps."""
    root = tmp_path_factory.mktemp("lora")
    train(load_config(write_config(root / "run.yaml", data, root / "run")))
    reset_accelerate()
    return root / "run"


def test_only_the_adapters_train(run):
    state = load_file(run / "checkpoints/step_00000008/model.safetensors")
    adapters = {key: value for key, value in state.items() if ".lora_" in key}
    base = {key.replace(".base_layer", ""): value for key, value in state.items() if key not in adapters}
    initial = base_model().state_dict()
    assert base.keys() == initial.keys()
    for key, value in base.items():
        assert torch.equal(value, initial[key]), key  # the frozen base, bit for bit
    # lora_A and lora_B of qkv, proj (attention's, and the MLP's first as it ends in "proj"), mlp.net.2
    # and modulation in 2 blocks, and of proj_out
    assert len(adapters) == 2 * (5 * 2 + 1)
    moved = [key for key, value in adapters.items() if "lora_B" in key and value.abs().max() > 0]
    assert len(moved) == 11  # lora_B starts at zero: every adapter trained

    optimizer = torch.load(run / "checkpoints/step_00000008/optimizer.bin", weights_only=True)
    assert len(optimizer["param_groups"][0]["params"]) == len(adapters)  # AdamW holds the adapters only
    ema = torch.load(run / "checkpoints/step_00000008/custom_checkpoint_0.pkl", weights_only=True)
    shapes = sorted(tuple(p.shape) for p in ema["shadow_params"])  # the EMA of the adapters only
    assert shapes == sorted(tuple(value.shape) for value in adapters.values())

    model = run / "model"  # the frozen base as a plain model, the EMA of the adapters beside it
    assert sorted(p.name for p in model.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "noise.json",
        LORA_FILE,
        "sampling.json",  # how the model was validated (`dforce.diffusion.recipe`)
    ]
    exported = load_file(model / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == initial.keys() and all(torch.equal(exported[k], initial[k]) for k in initial)
    assert all(key.startswith("transformer.") and ".lora_" in key for key in load_file(model / LORA_FILE))


def test_resumed_lora_run_is_bitwise_the_uninterrupted_one(tmp_path, data, run):
    """Stopped after its checkpoint at step 4 and run again: the uninterrupted 8-step run, bit for bit,
    adapters, optimiser, EMA and the exported model alike."""
    config = write_config(tmp_path / "run.yaml", data, tmp_path / "run")
    train(load_config(config, ["train.max_steps=4"]))
    reset_accelerate()
    train(load_config(config))
    for name in "model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl":
        resumed, reference = (r / "checkpoints/step_00000008" / name for r in (tmp_path / "run", run))
        assert resumed.read_bytes() == reference.read_bytes(), name
    resumed, reference = tmp_path / "run/model", run / "model"
    name = "diffusion_pytorch_model.safetensors"
    assert (resumed / name).read_bytes() == (reference / name).read_bytes()
    # (safetensors writes the LoRA file's metadata entries in no fixed order: compared by content)
    adapters, expected = (load_file(r / LORA_FILE) for r in (resumed, reference))
    assert adapters.keys() == expected.keys() and all(torch.equal(adapters[k], expected[k]) for k in expected)
    with safe_open(resumed / LORA_FILE, "pt") as new, safe_open(reference / LORA_FILE, "pt") as old:
        assert new.metadata() == old.metadata()


def test_exported_adapters_load_through_diffusers(run):
    """The LoRA file read as a Wan pipeline's `load_lora_weights` reads it, into a fresh model loaded from
    the base weights: the outputs of the trained model under its EMA weights, exactly."""
    state, metadata = WanLoraLoaderMixin.lora_state_dict(run / "model", return_lora_metadata=True)
    fresh = CausalVideoTransformer.from_pretrained(run / "model")
    assert not has_lora(fresh)
    WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=fresh, metadata=metadata)

    reference = base_model()  # the run's model with its EMA adapters put in by hand
    add_lora(reference, load_config(run.parent / "run.yaml").train.lora)
    ema = torch.load(run / "checkpoints/step_00000008/custom_checkpoint_0.pkl", weights_only=True)
    trained = [p for p in reference.parameters() if p.requires_grad]
    with torch.no_grad():
        for parameter, shadow in zip(trained, ema["shadow_params"], strict=True):
            parameter.copy_(shadow)
    expected = outputs(reference)
    assert expected.abs().mean() > 1e-3  # the adapters changed the zero model
    assert torch.equal(outputs(fresh), expected)
    loaded, _ = load_model(run / "model")  # what `dforce sample` and `dforce eval` use
    assert has_lora(loaded) and torch.equal(outputs(loaded), expected)


def test_export_merges_into_a_plain_model(tmp_path, run, capsys):
    main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge-lora"])
    assert "LoRA adapters merged into the weights" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert sorted(p.name for p in merged.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "noise.json",
        "sampling.json",  # the run's sampling recipe, carried over
    ]
    plain = CausalVideoTransformer.from_pretrained(merged)  # no peft: the model's own keys, all of them
    assert (
        load_file(merged / "diffusion_pytorch_model.safetensors").keys() == base_model().state_dict().keys()
    )
    assert all(type(m) is not nn.Linear or "lora" not in n for n, m in plain.named_modules())
    adapted, _ = load_model(run / "model")
    torch.testing.assert_close(outputs(plain), outputs(adapted), rtol=1e-5, atol=1e-6)

    main(["export", str(run / "model"), "--out", str(tmp_path / "adapters")])
    assert LORA_FILE in {p.name for p in (tmp_path / "adapters").iterdir()}
    assert torch.equal(outputs(load_model(tmp_path / "adapters")[0]), outputs(adapted))
    with pytest.raises(SystemExit, match=r"--out .*merged: exists"):
        main(["export", str(run), "--out", str(merged)])


SELF_FORCING = """\
output_dir: {out}
seed: 0
objective: self_forcing
self_forcing: {{teacher: "{teacher}", steps: 2, context_frames: 1, critic_steps: 1, min_level: 2,
               max_level: 48}}
train: {{max_steps: 2, checkpoint_every: 2, batch_size: 2, lr: 1e-3, trackers: [], lora: {{rank: 2}}}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
"""


def test_self_forcing_trains_adapters_over_one_teacher(tmp_path, data, run):
    """The generator and the critic are the teacher's own weight tensors with an adapter each (the run's
    LoRA model as the teacher, merged: a trained, non-zero base); only the adapters move."""
    teacher = tmp_path / "teacher"
    main(["export", str(run), "--out", str(teacher), "--merge-lora"])
    config_file = tmp_path / "sf.yaml"
    config_file.write_text(SELF_FORCING.format(out=tmp_path / "sf", teacher=teacher, data=data))
    config = load_config(config_file)
    objective = SelfForcingObjective(config, Trainer(config, plan_start(config)))
    shared = [objective.teacher.blocks[0].qkv.weight] + [
        net.blocks[0].qkv.base_layer.weight for net in (objective.model, objective.critic)
    ]
    assert len({p.data_ptr() for p in shared}) == 1 and not any(p.requires_grad for p in shared)
    reset_accelerate()
    bf16 = load_config(config_file, ["train.mixed_precision=bf16"])
    objective = SelfForcingObjective(bf16, Trainer(bf16, plan_start(bf16)))
    frozen = [p for net in (objective.teacher, objective.model, objective.critic) for p in net.parameters()]
    assert {p.dtype for p in frozen if not p.requires_grad} == {torch.bfloat16}  # one copy, in bf16
    assert {p.dtype for p in frozen if p.requires_grad} == {torch.float32}  # the adapters
    reset_accelerate()

    train(config)
    checkpoint = tmp_path / "sf/checkpoints/step_00000002"
    weights = load_file(teacher / "diffusion_pytorch_model.safetensors")
    for name in "model.safetensors", "model_1.safetensors":  # generator, critic
        state = load_file(checkpoint / name)
        for key, value in state.items():
            if ".lora_" not in key:
                assert torch.equal(value, weights[key.replace(".base_layer", "")]), (name, key)
        assert any(value.abs().max() > 0 for key, value in state.items() if "lora_B" in key), name
    assert load_file(checkpoint / "model_2.safetensors").keys() == weights.keys()  # the teacher: plain
    assert (tmp_path / "sf/model" / LORA_FILE).is_file()


def test_bad_keys_are_named(tmp_path, data, run):
    config = write_config(tmp_path / "run.yaml", data, tmp_path / "run")
    for override, message in [
        ("train.lora.rnk=4", "train.lora.rnk: unknown key; valid keys: rank, alpha, target_modules, dropout"),
        ("train.lora.rank=0", "train.lora.rank: must be >= 1, got 0"),
        ("train.lora.dropout=1.5", "train.lora.dropout: must lie in [0, 1), got 1.5"),
        ("train.lora=4", "train.lora: expected dforce.models.lora.LoraConfig | None, got 4"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"{config}: {message}")):
            load_config(config, [override])
    with pytest.raises(SystemExit) as stop:  # checked against the model's own module names
        main(["train", str(config), "train.lora.target_modules=[qkv, attn]"])
    assert (
        "train.lora.target_modules: 'attn' matches no module of CausalVideoTransformer; its linear modules: "
        "patch_embed, time_embed.linear_1, time_embed.linear_2, blocks.*.qkv, blocks.*.proj, "
        "blocks.*.mlp.net.0.proj, blocks.*.mlp.net.2, blocks.*.modulation, modulation_out, proj_out"
        in str(stop.value)
    )

    # A resumed run must not change its adapters: every LoRA key defines the run.
    with pytest.raises(RunMismatch, match=r"train\.lora\.rank: 4 -> 8"):
        plan_start(load_config(run.parent / "run.yaml", ["train.lora.rank=8"]))
    with pytest.raises(RunMismatch, match=r"train\.lora"):
        plan_start(load_config(run.parent / "run.yaml", ["train.lora=null"]))


def test_wan_adapters_save_load_and_merge(tmp_path):
    """A tiny diffusers Wan transformer: the default targets (attention and FFN), the LoRA file read back by
    diffusers, and the merge, as for our own model."""
    torch.manual_seed(0)
    wan = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
        ffn_dim=16, num_layers=1, rope_max_seq_len=16,
    )  # fmt: skip
    add_lora(wan, LoraConfig(rank=2))
    with torch.no_grad():
        for name, parameter in wan.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in wan.named_parameters() if ".lora_A" in name}
    assert adapted == {
        f"blocks.0.{attention}.{layer}"
        for attention in ("attn1", "attn2")
        for layer in ("to_q", "to_k", "to_v", "to_out.0")
    } | {"blocks.0.ffn.net.0.proj", "blocks.0.ffn.net.2"}

    generator = torch.Generator().manual_seed(0)
    args = {
        "hidden_states": torch.randn(1, 4, 2, 4, 4, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 3, 8, generator=generator),
        "return_dict": False,
    }

    def run(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(**args)[0]

    expected = run(wan)
    write_model(wan, NoiseConfig(), tmp_path / "wan")
    fresh = WanTransformer3DModel.from_pretrained(tmp_path / "wan")
    state, metadata = WanLoraLoaderMixin.lora_state_dict(tmp_path / "wan", return_lora_metadata=True)
    WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=fresh, metadata=metadata)
    loaded = {name.replace(".default_0.", ".default."): p for name, p in fresh.state_dict().items()}
    assert loaded.keys() == wan.state_dict().keys()
    assert all(torch.equal(loaded[name], p) for name, p in wan.state_dict().items())  # the same weights
    # The same computation up to rounding: diffusers' own save/load round trip of the bare Wan transformer,
    # no adapters at all, already moves its output by ~2e-7 (diffusers 0.42.1, torch 2.13 CPU).
    torch.testing.assert_close(run(fresh), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(merge_lora(fresh)), expected, rtol=1e-5, atol=1e-6)
    assert not has_lora(fresh)


def test_share_base_shares_every_weight():
    model = base_model()
    twin = share_base(model)
    assert [p.data_ptr() for p in twin.parameters()] == [p.data_ptr() for p in model.parameters()]
    add_lora(twin, LoraConfig(rank=2))
    assert not has_lora(model) and torch.equal(outputs(twin), outputs(model))


def test_wan_backbone_adapters_are_the_diffusers_transformers(tmp_path):
    """`dforce.models.wan.CausalWan` keeps its adapters in the diffusers transformer it wraps: the model
    directory is a Wan folder whose LoRA file plain diffusers loads with every key, and `load_model` reads it
    back."""
    torch.manual_seed(0)
    config = dict(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=1,
    )  # fmt: skip
    model = CausalWan(transformer_config=config, num_frames=2, sample_size=(4, 4))
    add_lora(model, LoraConfig(rank=2))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, _ in model.named_parameters() if ".lora_" in n
    ]
    write_model(model, NoiseConfig(), tmp_path / "wan")

    fresh = WanTransformer3DModel.from_pretrained(tmp_path / "wan")
    state, metadata = WanLoraLoaderMixin.lora_state_dict(tmp_path / "wan", return_lora_metadata=True)
    assert all(key.startswith("transformer.blocks.0.") for key in state)  # Wan's own names
    WanLoraLoaderMixin.load_lora_into_transformer(
        state, transformer=fresh, adapter_name="default", metadata=metadata
    )
    expected = model.transformer.state_dict()  # the base and the adapters, every key
    loaded = fresh.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)

    generator = torch.Generator().manual_seed(0)
    sample, timesteps = torch.randn(1, 2, 4, 4, 4, generator=generator), torch.tensor([[500, 300]])

    def run(net: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return net.eval()(sample, timesteps)

    reloaded, _ = load_model(tmp_path / "wan")
    assert has_lora(reloaded)
    assert all(torch.equal(p, model.state_dict()[name]) for name, p in reloaded.state_dict().items())
    # Same weights, outputs equal up to the rounding of diffusers' save/load round trip (see above).
    torch.testing.assert_close(run(reloaded), run(model), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(merge_lora(reloaded)), run(model), rtol=1e-5, atol=1e-6)
    assert not has_lora(reloaded)


WAN_RUN = """\
output_dir: {out}
seed: 0
train: {{max_steps: 2, checkpoint_every: 2, batch_size: 2, lr: 1e-3, trackers: [], lora: {{rank: 2}}}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4,
       size: 8}}
noise: {{levels: 50, schedule: flow, parameterization: flow}}
model:
  backbone: wan
  sample_size: [8, 8]
  text: false
  config: {{in_channels: 3, out_channels: 3, num_layers: 1, num_attention_heads: 2, attention_head_dim: 12,
           text_dim: 16, freq_dim: 16, ffn_dim: 32}}
"""


def test_wan_backbone_trains_adapters_and_merges(tmp_path, data):
    """`model: {backbone: wan}` with `train.lora`: the default targets train alone, and the merged export
    is a Wan folder that plain diffusers loads."""
    (tmp_path / "run.yaml").write_text(WAN_RUN.format(out=tmp_path / "run", data=data))
    model_dir = train(load_config(tmp_path / "run.yaml"))
    state = load_file(tmp_path / "run/checkpoints/step_00000002/model.safetensors")
    assert any(value.abs().max() > 0 for key, value in state.items() if "lora_B" in key)
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge-lora"])
    plain = WanTransformer3DModel.from_pretrained(tmp_path / "merged")
    assert not has_lora(plain)
    adapted, merged = load_model(model_dir)[0], load_model(tmp_path / "merged")[0]
    generator = torch.Generator().manual_seed(0)
    sample, timesteps = torch.randn(1, 4, 3, 8, 8, generator=generator), torch.tensor([[900, 600, 300, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(sample, timesteps), adapted(sample, timesteps), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("backbone", ["dforce", "wan"])
def test_frozen_weights_are_held_in_bf16_when_training_in_bf16(tmp_path, data, backbone):
    """Under `train.mixed_precision: bf16` the frozen base is held in bf16 (half its bytes) and the adapters
    in fp32; `train.frozen_fp32` keeps the base in fp32. Our model uses every frozen weight through
    autocast, which computes in bf16 either way: its adapters train bitwise alike. (Wan's do not: its
    modulation tables and norm weights are read outside autocast; the next test bounds that.)"""
    runs = {}
    for fp32 in (False, True):
        out, config = tmp_path / f"run_{fp32}", tmp_path / f"{fp32}.yaml"
        if backbone == "wan":
            config.write_text(WAN_RUN.format(out=out, data=data))
        else:
            write_config(config, data, out)
        overrides = [
            "train.mixed_precision=bf16",
            f"train.frozen_fp32={str(fp32).lower()}",
            "train.max_steps=2",
        ]
        train(load_config(config, [*overrides, "train.checkpoint_every=2"]))
        reset_accelerate()
        runs[fp32] = load_file(out / "checkpoints/step_00000002/model.safetensors")
    held, kept = runs[False], runs[True]
    adapters = [key for key in held if ".lora_" in key]
    base = [key for key in held if key not in adapters]
    assert {held[key].dtype for key in base} == {torch.bfloat16}
    assert {kept[key].dtype for key in base} == {torch.float32}
    assert all(torch.equal(held[key], kept[key].bfloat16()) for key in base)
    assert {held[key].dtype for key in adapters} == {torch.float32}
    if backbone == "dforce":
        assert all(torch.equal(held[key], kept[key]) for key in adapters)


def test_a_wan_base_in_bf16_is_the_fp32_base_within_rounding():
    """Wan with adapters under bf16 autocast, its frozen base held in bf16 against fp32: outputs within 1%
    of their scale and the adapters' gradients within 1% (measured: 0.43% and 0.29%; bf16 rounding of the
    weights read outside autocast: modulation tables, norm weights)."""
    section = {"backbone": "wan", "sample_size": (8, 8), "num_frames": 4, "text": False}
    section["config"] = {"in_channels": 3, "out_channels": 3, "num_layers": 2, "num_attention_heads": 2,
                         "attention_head_dim": 12, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32}  # fmt: skip
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = build_model(section)
        add_lora(model, LoraConfig(rank=2))
        for name, parameter in model.named_parameters():  # adapters that have moved off zero
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02, generator=torch.Generator().manual_seed(1))
        hold_frozen(model, dtype)
        sample, timesteps = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(2)), None
        timesteps = torch.tensor([[900, 600, 300, 0], [10, 500, 990, 250]])
        with torch.autocast("cpu", torch.bfloat16):
            out = model(sample, timesteps).float()
        out.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".lora_" in n])
        results.append((out.detach(), grads))
    (out32, grad32), (out16, grad16) = results
    assert (out16 - out32).abs().max() < 0.01 * out32.abs().max()
    assert (grad16 - grad32).norm() < 0.01 * grad32.norm()
