"""The wan backbone (`dforce.models.wan`): tiny random Wan and SkyReels-V2 transformers, saved by diffusers
and loaded as `model: {backbone: wan, pretrained: DIR}` is. Its forward is diffusers' own where diffusers
has one, block-causal exactly, cached == recomputed, the teacher layout == per-block forwards; it trains
under every weighting and self-forcing, and exports a folder plain diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate, shipped_fsdp_policy
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel

from dforce.cli import main
from dforce.data.latents import LatentSpace
from dforce.diffusion.trajectory import WEIGHTINGS
from dforce.evaluation.ablate import ablate
from dforce.models.backbone import build_model
from dforce.models.wan import SETTINGS_FILE, CausalWan
from dforce.training.checkpoint import load_model
from dforce.training.config import ConfigError, load_config
from dforce.training.train import train
from dforce.training.trainer import check_frames

HORIZON = 6
TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
)  # fmt: skip
CLASSES = {
    "wan": (WanTransformer3DModel, {}),
    "skyreels": (SkyReelsV2Transformer3DModel, {"inject_sample_info": True}),
}


@pytest.fixture(scope="module", params=list(CLASSES))
def pretrained(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A random diffusers transformer (SkyReels-V2 with its fps embedding) written by `save_pretrained`
    in a pipeline's `transformer` subfolder, and the diffusers model itself."""
    cls, extra = CLASSES[request.param]
    torch.manual_seed(0)
    reference = cls(**TINY, **extra).eval()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder / "transformer")
    return folder, reference


def load(folder: Path, frames_per_block: int = 1, **settings) -> CausalWan:
    """The model a config `model: {backbone: wan, pretrained: folder, subfolder: transformer, ...}` builds."""
    section = dict(backbone="wan", pretrained=str(folder), subfolder="transformer", sample_size=(8, 8))
    section |= dict(num_frames=HORIZON, frames_per_block=frames_per_block, **settings)
    model = build_model(section).eval()
    model.attention_backend = "sdpa"
    return model


def inputs(batch: int = 2, frames: int = HORIZON, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, 4, 8, 8, generator=generator)  # [B, T, C, H, W]
    timesteps = torch.randint(0, 1000, (batch, frames), generator=generator)  # [B, T]
    return sample, timesteps


def text(batch: int = 2, length: int = 5, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings [B, L, 16] and a mask [B, L] with the last clip's last two tokens padding."""
    states = torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, -2:] = False
    return states, mask


def diffusers_forward(reference, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, **kw):
    """The diffusers model on our layout: [B, T, C, H, W] in and out (it takes and gives [B, C, T, H, W])."""
    if isinstance(reference, SkyReelsV2Transformer3DModel):
        kw.setdefault("fps", [0] * len(sample))  # 16 fps, what the wrapper tells the fps embedding
    out = reference(sample.transpose(1, 2), timestep, states, **kw).sample
    return out.transpose(1, 2)


def test_full_visibility_is_the_diffusers_forward(pretrained):
    """One block of every frame and one timestep a clip: diffusers' own forward, text padding zeroed as
    Wan's pipeline pads, and no text as one zero token."""
    folder, reference = pretrained
    model = load(folder, frames_per_block=HORIZON)
    sample, _ = inputs()
    timestep = torch.tensor([981, 17])
    states, mask = text()
    with torch.no_grad():
        ours = model(sample, timestep[:, None].expand(-1, HORIZON), encoder_hidden_states=states,
                     encoder_attention_mask=mask)  # fmt: skip
        theirs = diffusers_forward(reference, sample, timestep, states * mask[..., None])
        torch.testing.assert_close(ours, theirs)
        assert not torch.allclose(ours, diffusers_forward(reference, sample, timestep, states))
        no_text = diffusers_forward(reference, sample, timestep, torch.zeros(2, 1, 16))
        levels = timestep[:, None].expand(-1, HORIZON)
        torch.testing.assert_close(model(sample, levels), no_text)
        null = model(
            sample, levels, encoder_hidden_states=states, encoder_attention_mask=torch.zeros_like(mask)
        )
        torch.testing.assert_close(null, no_text)  # the null text (no tokens) is no text


def test_per_frame_timesteps_are_the_diffusers_per_token_path(pretrained):
    """Each frame's timestep modulates its tokens as Wan 2.2's per-token timesteps do, and (SkyReels-V2)
    as its own diffusion-forcing forward does, block-causal mask included."""
    folder, reference = pretrained
    sample, timesteps = inputs(batch=1)  # SkyReels-V2's fps embedding under diffusion forcing: batch 1
    states, _ = text(batch=1)
    with torch.no_grad():
        if isinstance(reference, WanTransformer3DModel):
            ours = load(folder, frames_per_block=HORIZON)(sample, timesteps, encoder_hidden_states=states)
            theirs = diffusers_forward(reference, sample, timesteps.repeat_interleave(16, dim=1), states)
        else:
            ours = load(folder, frames_per_block=2)(sample, timesteps, encoder_hidden_states=states)
            reference._set_ar_attention(2)
            try:
                theirs = diffusers_forward(
                    reference, sample, timesteps, states, enable_diffusion_forcing=True
                )
            finally:
                reference._set_ar_attention(1)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_causality_is_exact(pretrained, frames_per_block):
    """Changing every frame after block b, values and timesteps, leaves blocks <= b bitwise unchanged."""
    model = load(pretrained[0], frames_per_block)
    sample, timesteps = inputs()
    states, mask = text()
    with torch.no_grad():
        reference = model(sample, timesteps, encoder_hidden_states=states, encoder_attention_mask=mask)
        for first_changed in range(frames_per_block, HORIZON, frames_per_block):
            other, other_t = inputs(seed=first_changed + 10)
            changed = torch.cat([sample[:, :first_changed], other[:, first_changed:]], dim=1)
            changed_t = torch.cat([timesteps[:, :first_changed], other_t[:, first_changed:]], dim=1)
            out = model(changed, changed_t, encoder_hidden_states=states, encoder_attention_mask=mask)
            assert torch.equal(out[:, :first_changed], reference[:, :first_changed])
            assert not torch.allclose(out[:, first_changed:], reference[:, first_changed:])


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_cache_equals_full_forward(pretrained, frames_per_block):
    model = load(pretrained[0], frames_per_block)
    sample, timesteps = inputs()
    states, mask = text()
    kw = dict(encoder_hidden_states=states, encoder_attention_mask=mask)
    cache = model.new_cache()
    with torch.no_grad():
        full = model(sample, timesteps, **kw)
        cached = []
        for start in range(0, HORIZON, frames_per_block):
            block = slice(start, start + frames_per_block)
            # Denoise a block against the cache without writing it, then write it at its final level.
            model(sample[:, block] * 2, timesteps[:, block] // 2, cache=cache, **kw)
            cached.append(model(sample[:, block], timesteps[:, block], cache=cache, update_cache=True, **kw))
    torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rolling_cache_with_a_sink_past_the_horizon(pretrained):
    """One layer, so a frame's keys depend on that frame alone: past the horizon the rolling cache equals
    a cache that holds the sink and then only the newest frames, each at its absolute position."""
    _, reference = pretrained
    torch.manual_seed(0)
    config = {**reference.config, "num_layers": 1}
    model = CausalWan(
        transformer_class=type(reference).__name__,
        transformer_config=config,
        num_frames=HORIZON,
        sample_size=(8, 8),
    ).eval()
    model.attention_backend = "sdpa"
    sample, timesteps = inputs(frames=3 * HORIZON)
    rolling = model.new_cache(sink_frames=1)
    with torch.no_grad():
        for t in range(3 * HORIZON):
            frame = slice(t, t + 1)
            if t >= HORIZON:
                fresh = model.new_cache(sink_frames=1)
                model(sample[:, :1], timesteps[:, :1], cache=fresh, update_cache=True)
                fresh.end = rolling.start  # skip the dropped frames
                window = slice(rolling.start, t)
                model(sample[:, window], timesteps[:, window], cache=fresh, update_cache=True)
                out = model(sample[:, frame], timesteps[:, frame], cache=rolling)
                again = model(sample[:, frame], timesteps[:, frame], cache=fresh)
                torch.testing.assert_close(out, again, atol=1e-5, rtol=1e-5)
            model(sample[:, frame], timesteps[:, frame], cache=rolling, update_cache=True)
    assert (rolling.frames, rolling.end) == (HORIZON - 1, 3 * HORIZON)


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_teacher_forcing_layout(pretrained, frames_per_block):
    """Noisy block b in the layout == a block-causal forward on clean blocks < b then noisy block b."""
    model = load(pretrained[0], frames_per_block)
    clean, _ = inputs(seed=2)
    noisy, timesteps = inputs(seed=3)
    states, mask = text()
    kw = dict(encoder_hidden_states=states, encoder_attention_mask=mask)
    with torch.no_grad():
        layout = model(noisy, timesteps, context=clean, **kw)
        for start in range(0, HORIZON, frames_per_block):
            stop = start + frames_per_block
            sample = torch.cat([clean[:, :start], noisy[:, start:stop]], dim=1)
            levels = torch.cat([torch.zeros_like(timesteps[:, :start]), timesteps[:, start:stop]], dim=1)
            alone = model(sample, levels, **kw)[:, start:]
            torch.testing.assert_close(layout[:, start:stop], alone, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(pretrained):
    model = load(pretrained[0], 2).train()
    sample, timesteps = inputs()
    clean, _ = inputs(seed=4)
    grads = []
    for checkpointing in False, True:
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        model(sample, timesteps, context=clean).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_flex_blocks_compile_without_graph_breaks():
    """What a GPU run compiles by default: each block with our processor, flex_attention and its block
    mask, traced whole (training, teacher and cached layouts); aot_eager runs the traced graph."""
    torch.manual_seed(0)
    model = CausalWan(
        transformer_config=TINY, num_frames=HORIZON, frames_per_block=2, sample_size=(8, 8)
    ).eval()
    sample, timesteps = inputs()
    context, _ = inputs(seed=4)

    def run() -> list[torch.Tensor]:
        cache = model.new_cache()
        first = model(sample[:, :2], timesteps[:, :2], cache=cache, update_cache=True)
        return [model(sample, timesteps), model(sample, timesteps, context=context), first,
                model(sample[:, 2:4], timesteps[:, 2:4], cache=cache)]  # fmt: skip

    with torch.no_grad():
        model.attention_backend = "sdpa"
        eager = run()
        model.attention_backend = "flex"
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = run()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_export_loads_in_diffusers_and_dforce(pretrained, tmp_path):
    """What training exports: diffusers' own folder (its class, its weights) plus causal.json."""
    folder, reference = pretrained
    model = load(folder, frames_per_block=HORIZON)
    model.save_pretrained(tmp_path)
    (tmp_path / "noise.json").write_text(json.dumps({"levels": 1000}))
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == {
        "num_frames": HORIZON, "frames_per_block": HORIZON, "sample_size": [8, 8], "fps": 16, "text": True,
    }  # fmt: skip
    plain = type(reference).from_pretrained(tmp_path).eval()
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, CausalWan) and loaded.horizon == HORIZON and loaded.frame_shape == (4, 8, 8)
    loaded.attention_backend = "sdpa"
    sample, _ = inputs()
    timestep = torch.tensor([500, 3])
    states, _ = text()
    with torch.no_grad():
        ours = loaded(sample, timestep[:, None].expand(-1, HORIZON), encoder_hidden_states=states)
        torch.testing.assert_close(ours, diffusers_forward(plain, sample, timestep, states))
    rebuilt = type(model).from_config(model.config)  # what an FSDP export builds before loading the state
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.transformer.config == model.transformer.config


def test_fsdp_auto_wrap_finds_the_blocks(pretrained, monkeypatch):
    """The shipped FSDP config's transformer auto-wrap policy, which names no class, wraps each diffusers
    block."""
    model = load(pretrained[0])
    policy = shipped_fsdp_policy(model, monkeypatch)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == ["transformer.blocks.0", "transformer.blocks.1"]


# ---- training, end to end


RUN = """\
output_dir: {out}
seed: 0
train: {{max_steps: 2, checkpoint_every: 2, batch_size: 2, log_every: 1, lr: 1e-3, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4,
       size: 8}}
noise: {{levels: 50, schedule: flow, parameterization: flow}}
trajectory: {{name: {weighting}}}
model:
  backbone: wan
  class_name: {cls}
  sample_size: [8, 8]
  text: false
  config: {{in_channels: 3, out_channels: 3, num_layers: 1, num_attention_heads: 2, attention_head_dim: 12,
           text_dim: 16, freq_dim: 16, ffn_dim: 32}}
"""
OPTIONS = {"schedule": "schedule:autoregressive", "mixture": "mixture"}
MIXTURE = "trajectory.options={components: {paths: 0.5, teacher: 0.5}}"


def run_config(tmp_path: Path, data: Path, weighting: str = "paths", cls: str = "WanTransformer3DModel"):
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(out=tmp_path / "run", data=data, weighting=weighting, cls=cls))
    return path


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
def test_trains_under_every_weighting(tmp_path, data, weighting):
    overrides = [MIXTURE] if weighting == "mixture" else []
    config = load_config(run_config(tmp_path, data, OPTIONS.get(weighting, weighting)), overrides)
    model, _ = load_model(train(config))
    torch.manual_seed(config.seed)  # the start training built
    start = build_model(config.model | {"num_frames": 4}).state_dict()
    assert isinstance(model, CausalWan) and model.horizon == 4 and model.text_dim is None
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())


def test_resumes_from_its_checkpoint(tmp_path, data):
    """Accelerate's `save_state` of the wrapped model, read back: the rerun continues at step 2."""
    path = run_config(tmp_path, data)
    train(load_config(path))
    reset_accelerate()
    train(load_config(path, ["train.max_steps=3"]))
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000003",
    ]


@pytest.fixture(scope="module")
def wan_teacher(tmp_path_factory, data) -> Path:
    """A SkyReels-V2 teacher trained with the teacher weighting, validated (rollouts) on the way."""
    root = tmp_path_factory.mktemp("wan_teacher")
    overrides = [
        f"validation.shards={data}/val-*.tar", "validation.every=2", "validation.batches=1",
        "validation.weightings=[teacher]", "validation.rollout_clips=1", "validation.context_frames=2",
        "validation.rollout_frames=6", "validation.sampling_steps=2", "loss.drop_history=0.2",
    ]  # fmt: skip
    path = run_config(root, data, "teacher", "SkyReelsV2Transformer3DModel")
    model = train(load_config(path, overrides))
    reset_accelerate()
    return model


def test_self_forcing_with_ode_init(tmp_path, data, wan_teacher):
    path = tmp_path / "student.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'run'}\nseed: 0\nobjective: self_forcing\n"
        f'self_forcing: {{teacher: "{wan_teacher}", init: ode, ode_steps: 1, ode_sampling_steps: 2, '
        "steps: 2, context_frames: 1, rollout_frames: 6, critic_steps: 1, min_level: 2, max_level: 48}\n"
        "train: {max_steps: 1, checkpoint_every: 2, batch_size: 2, lr: 1e-4, trackers: []}\n"
        f'data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, '
        "shuffle_buffer: 4, size: 8}\n"
    )
    model, noise = load_model(train(load_config(path)))
    assert isinstance(model, CausalWan) and noise.parameterization == "flow"
    assert type(model.transformer) is SkyReelsV2Transformer3DModel


def test_sample_and_eval_commands(tmp_path, data, wan_teacher, capsys):
    main(
        [
            "sample",
            "--model",
            str(wan_teacher),
            "--frames",
            "6",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "a.mp4"),
        ]
    )
    assert (tmp_path / "a.mp4").stat().st_size > 0
    main(["eval", "--model", str(wan_teacher), "--data", f"{data}/val-*.tar", "--clips", "1",
          "--context-frames", "2", "--frames", "6", "--steps", "2", "--out", str(tmp_path / "eval"),
          "--ode-steps", "2"])  # fmt: skip
    assert "psnr_past_horizon" in capsys.readouterr().out


def test_ablate(tmp_path, data):
    overrides = [
        f"validation.shards={data}/val-*.tar",
        "validation.weightings=[paths]",
        "validation.every=2",
    ]
    overrides += ["validation.rollout_clips=0", "validation.context_frames=2", "validation.rollout_frames=4"]
    out = ablate(run_config(tmp_path, data), ["paths"], 1, overrides, schedules=["autoregressive"], clips=2,
                 elbo_draws=2, progress=False)  # fmt: skip
    assert "| paths | autoregressive |" in (out / "results.md").read_text()


# ---- bad input


def test_bad_inputs_name_the_problem(tmp_path, data, pretrained):
    path = run_config(tmp_path, data)
    with pytest.raises(ConfigError, match=r"model\.backbone: unknown backbone 'wann'; valid: dforce, wan"):
        load_config(path, ["model.backbone=wann"])
    with pytest.raises(ConfigError, match=r"model\.sample_size: required for the wan backbone"):
        load_config(path, ["model.sample_size=null"])
    with pytest.raises(
        ConfigError, match=r"model\.num_layers: unknown key; valid keys: sample_size, num_frames"
    ):
        load_config(path, ["model.num_layers=2"])
    with pytest.raises(ConfigError, match=r"model\.config\.num_layerz: unknown key of WanTransformer3DModel"):
        load_config(path, ["model.config.num_layerz=2"])
    with pytest.raises(
        ConfigError, match=r"model\.class_name: 'Flux' is not one of WanTransformer3DModel, Sky"
    ):
        load_config(path, ["model.class_name=Flux"])
    with pytest.raises(
        ConfigError, match=r"model\.config\.patch_size: \[2, 2, 2\].*temporal patch must be 1"
    ):
        load_config(path, ["model.config.patch_size=[2, 2, 2]"])
    with pytest.raises(ConfigError, match=r"model\.config: WanTransformer3DModel cannot be built from it"):
        load_config(path, ["model.config.num_layers=two"])
    with pytest.raises(ConfigError, match=r"model\.config: image-to-video"):
        load_config(path, ["model.config.image_dim=8"])
    with pytest.raises(ConfigError, match=r"model\.pretrained: give pretrained .* or class_name and config"):
        load_config(path, [f"model.pretrained={pretrained[0]}"])
    with pytest.raises(ConfigError, match=r"model\.sample_size: expected tuple\[int, int\] \| None, got 8"):
        load_config(path, ["model.sample_size=8"])
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    supported = "WanTransformer3DModel, SkyReelsV2Transformer3DModel"
    with pytest.raises(ConfigError, match=rf"model\.pretrained: .*unet holds a UNet2DConditionModel; the wan "
                       rf"backbone takes one of {supported}"):  # fmt: skip
        load_config(path, [f"model.pretrained={other}", "model.class_name=null", "model.config=null"])
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*nowhere: no config\.json"):
        load_config(
            path, [f"model.pretrained={tmp_path / 'nowhere'}", "model.class_name=null", "model.config=null"]
        )


def test_data_that_is_not_the_model_frames_fails_before_training(tmp_path, data):
    path = run_config(tmp_path, data)
    reads = r"the model \(CausalWan\) reads frames of \(C, H, W\)"
    with pytest.raises(
        ConfigError, match=rf"data\.shards: the shards hold RGB pixel frames; {reads} \(4, 8, 8\)"
    ):
        train(load_config(path, ["model.config.in_channels=4"]))
    reset_accelerate()
    with pytest.raises(ConfigError, match=rf"data\.size: 16 gives 16x16 frames; {reads} \(3, 8, 8\)"):
        train(load_config(path, ["data.size=16"]))
    assert not (tmp_path / "run/checkpoints").exists()
    config = load_config(path)
    model = build_model(config.model | {"num_frames": 4})
    space = LatentSpace("AutoencoderKLWan", "0" * 64, "/vae", None, 4, 8, causal=True, channels=16)
    with pytest.raises(ConfigError, match=rf"data\.shards: the shards hold AutoencoderKLWan latents of 16 "
                       rf"channels; {reads} \(3, 8, 8\)"):  # fmt: skip
        check_frames(config, model, space)


def test_bad_model_inputs_name_the_problem(pretrained, tmp_path):
    model = load(pretrained[0], 2)
    sample, timesteps = inputs()
    with pytest.raises(ValueError, match="does not match the model"):
        model(sample[..., :4], timesteps)
    with pytest.raises(ValueError, match="training horizon num_frames=6"):
        model(torch.cat([sample, sample], 1), torch.cat([timesteps, timesteps], 1))
    with pytest.raises(ValueError, match="takes no labels"):
        model(sample, timesteps, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"encoder_hidden_states \(2, 5, 8\) must be \[B=2, L, 16\]"):
        model(sample, timesteps, encoder_hidden_states=torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match="encoder_hidden_states given to a model built with text: false"):
        load(pretrained[0], 2, text=False)(sample, timesteps, encoder_hidden_states=torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match="num_frames 6 is not a multiple of frames_per_block 4"):
        load(pretrained[0], 4)
    with pytest.raises(ValueError, match=r"no causal\.json; give the settings num_frames, sample_size"):
        CausalWan.from_pretrained(pretrained[0], "transformer")
