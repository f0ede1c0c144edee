"""Self-forcing's roles (`dforce.training.objectives.roles`): a plain diffusers Wan / SkyReels-V2 folder is a
bidirectional teacher and critic whose forward on the full clip is diffusers' own, the generator is causal in
its own blocks over the same weights (one copy under LoRA), and self-forcing trains from such a folder with
no diffusion-forcing stage, ODE init included."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from diffusers import WanTransformer3DModel
from test_text import encoder_dir, text_data  # noqa: F401 (fixtures)
from test_wan import HORIZON, TINY, diffusers_forward, inputs, pretrained, text  # noqa: F401 (pretrained: a fixture)

from dforce.cli import main
from dforce.data.text import Text
from dforce.models.wan import CausalWan
from dforce.training.checkpoint import WAN_NOISE, load_model, write_model
from dforce.training.config import ConfigError, SelfForcingConfig, load_config
from dforce.training.objectives.roles import build_roles
from dforce.training.train import train


@pytest.mark.parametrize("lora", [True, False])
def test_a_diffusers_folder_is_a_bidirectional_teacher_and_critic(pretrained, lora):
    root, reference = pretrained
    sf = SelfForcingConfig(teacher=str(root), frames_per_block=2, sample_size=[8, 8])
    roles = build_roles(sf, lora, HORIZON, None)
    assert roles.bidirectional and roles.noise == WAN_NOISE
    assert (roles.teacher.frames_per_block, roles.critic.frames_per_block) == (HORIZON, HORIZON)
    assert roles.generator.frames_per_block == 2 and roles.generator.horizon == HORIZON
    sample, _ = inputs()
    timestep = torch.tensor([981, 17])
    states, mask = text()
    theirs = diffusers_forward(reference, sample, timestep, states * mask[..., None])
    for net in roles.teacher, roles.critic:  # the full clip at one level: diffusers' own forward
        net.eval().attention_backend = "sdpa"
        with torch.no_grad():
            ours = net(sample, timestep[:, None].expand(-1, HORIZON), encoder_hidden_states=states,
                       encoder_attention_mask=mask)  # fmt: skip
        torch.testing.assert_close(ours, theirs)
    generator = roles.generator.eval()
    generator.attention_backend = "sdpa"
    levels = timestep[:, None].expand(-1, HORIZON)
    later = sample.clone()
    later[:, 2:] = torch.randn_like(later[:, 2:])
    with torch.no_grad():  # causal in blocks of 2: the first block does not see the later ones
        first, changed = (generator(x, levels, encoder_hidden_states=states)[:, :2] for x in (sample, later))
    assert torch.equal(first, changed)
    weight = "transformer.blocks.0.attn1.to_q.weight"
    teacher_weight = roles.teacher.state_dict()[weight]
    for role in roles.generator, roles.critic:  # one copy under LoRA; trainable copies otherwise
        mine = role.state_dict()[weight]
        assert torch.equal(mine, teacher_weight)
        assert (mine.data_ptr() == teacher_weight.data_ptr()) == lora
        assert all(p.requires_grad != lora for p in role.parameters())


def test_roles_that_do_not_fit_name_the_key(pretrained, tmp_path):
    root, _ = pretrained
    with pytest.raises(ConfigError, match=r"self_forcing.frames_per_block: the teacher attends"):
        build_roles(SelfForcingConfig(teacher=str(root), sample_size=[8, 8]), True, HORIZON, None)
    with pytest.raises(ConfigError, match=r"self_forcing.sample_size: .* diffusers folder"):
        build_roles(SelfForcingConfig(teacher=str(root / "transformer"), frames_per_block=2), True, 6, None)
    with pytest.raises(ConfigError, match=r"self_forcing.teacher: .* holds neither"):
        build_roles(SelfForcingConfig(teacher=str(tmp_path)), True, HORIZON, None)
    with pytest.raises(ConfigError, match=r"self_forcing.frames_per_block: num_frames 6 is not a multiple"):
        build_roles(
            SelfForcingConfig(teacher=str(root), frames_per_block=4, sample_size=[8, 8]), True, 6, None
        )


STUDENT = """\
output_dir: {out}
seed: 0
objective: self_forcing
self_forcing: {{teacher: "{teacher}", frames_per_block: 2, sample_size: [8, 8], init: ode, ode_steps: 1,
               ode_sampling_steps: 3, ode_shift: 3.0, steps: [1000, 600], shift: 2.0, sampler: renoise,
               exit: shared, context_frames: 0, critic_steps: 1, critic_lr: 2.0e-4, text_guidance: 4.0,
               negative_prompt: "{negative}"}}
train: {{max_steps: 2, checkpoint_every: 1, batch_size: 2, lr: 1e-4, trackers: [], lora: {{rank: 4}}}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, text_length: 8}}
"""


@pytest.fixture(scope="module")
def pixel_pipeline(tmp_path_factory) -> Path:
    """A diffusers Wan transformer folder of 3 channels, to train on the pixel balls of `data`."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wan_rgb")
    rgb = TINY | {"in_channels": 3, "out_channels": 3}
    WanTransformer3DModel(**rgb).save_pretrained(root / "transformer")
    return root


def test_self_forcing_from_a_diffusers_folder(tmp_path, text_data, encoder_dir, pixel_pipeline):
    """ODE init from the bidirectional teacher (the whole clip on its shifted grid), then distribution
    matching on the generator's explicit step list with the renoise step, the teacher guided against a
    negative prompt that `dforce encode-text --prompt` wrote; the exported generator is a causal Wan in
    blocks of 2 that records its sampling recipe, and a rerun resumes to the same weights."""
    negative = tmp_path / "negative.safetensors"
    main(["encode-text", "--prompt", "a still ball", "--encoder", str(encoder_dir), "--out", str(negative),
          "--text-length", "8"])  # fmt: skip
    assert Text.load(negative).states.shape == (1, 8, 16)
    path = tmp_path / "student.yaml"
    text = STUDENT.format(out=tmp_path / "run", teacher=pixel_pipeline, data=text_data[1], negative=negative)
    path.write_text(text)
    model_dir = train(load_config(path))
    model, noise = load_model(model_dir)
    assert isinstance(model, CausalWan) and noise == WAN_NOISE
    assert (model.horizon, model.frames_per_block) == (4, 2)
    recipe = (model_dir / "sampling.json").read_text()
    assert '"sampler": "renoise"' in recipe and '"steps": [\n    1000,\n    600\n  ]' in recipe
    reset_accelerate()
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    shutil.rmtree(tmp_path / "run/checkpoints/step_00000003")  # killed after step 2 (ODE, DMD): rerun
    resumed, _ = load_model(train(load_config(path)))
    reset_accelerate()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, whole[key]), key


def test_the_critic_and_generator_may_start_elsewhere(pretrained, tmp_path):
    """`self_forcing.critic` and `generator`: model directories whose weights start those roles, the critic
    rebuilt in the teacher's architecture (one block of the horizon), the generator kept causal."""
    root, _ = pretrained
    torch.manual_seed(1)
    other = CausalWan(
        transformer_config=dict(TINY), num_frames=HORIZON, frames_per_block=3, sample_size=(8, 8)
    )
    write_model(other, WAN_NOISE, tmp_path / "other")
    sf = SelfForcingConfig(
        teacher=str(root),
        sample_size=[8, 8],
        critic=str(tmp_path / "other"),
        generator=str(tmp_path / "other"),
    )
    roles = build_roles(sf, False, HORIZON, None)
    assert (roles.critic.frames_per_block, roles.generator.frames_per_block) == (HORIZON, 3)
    for role in roles.critic, roles.generator:
        weights = zip(role.state_dict().values(), other.state_dict().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in weights)
        assert all(p.requires_grad for p in role.parameters())
    with pytest.raises(ConfigError, match=r"self_forcing\.frames_per_block: 2, but the generator"):
        build_roles(dataclasses.replace(sf, frames_per_block=2), False, HORIZON, None)
