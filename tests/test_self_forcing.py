"""Self-forcing: the distribution-matching gradient moves a generator toward the data, only exit steps carry
gradient, the training rollout is the inference rollout, every process draws the same plan, and a killed
run resumes exactly."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import launch_two_processes, reset_accelerate
from safetensors.torch import load_file
from torch import nn

from dforce.cli import main
from dforce.data.synthetic import write_bouncing_balls
from dforce.diffusion.loss import DenoisingLoss
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.recipe import SamplingRecipe
from dforce.diffusion.rollout import chunk_schedule, rollout
from dforce.models.model import CausalVideoTransformer
from dforce.training import engine
from dforce.training.checkpoint import load_model
from dforce.training.config import ConfigError, load_config
from dforce.training.objectives import self_forcing
from dforce.training.objectives.dmd import Plan, SelfForcing, plan_rollout
from dforce.training.objectives.ode_init import ode_pairs
from dforce.training.objectives.self_forcing import SelfForcingObjective
from dforce.training.train import train

TEACHER = """\
output_dir: {out}
seed: 0
train: {{max_steps: 6, checkpoint_every: 6, batch_size: 2, lr: 2e-3, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
noise: {{levels: 50, parameterization: v}}
trajectory: {{name: teacher}}
loss: {{drop_history: 0.2}}
model: {{sample_size: 16, patch_size: 4, num_layers: 2, num_attention_heads: 2, attention_head_dim: 16}}
"""

STUDENT = """\
output_dir: {out}
seed: 0
objective: self_forcing
self_forcing: {{teacher: "{teacher}", steps: 3, shift: 2.0, context_frames: 1, rollout_frames: 6,
               critic_steps: 2, min_level: 2, max_level: 48}}
train: {{max_steps: 4, checkpoint_every: 2, batch_size: 2, lr: 1e-4, trackers: []}}
data: {{shards: "{data}/train-*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 4}}
"""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("teacher")
    write_bouncing_balls(root / "data", num_clips=8, frames=4, size=16, num_balls=1, seed=0, maxcount=8)
    (root / "teacher.yaml").write_text(TEACHER.format(out=root / "run", data=root / "data"))
    model = train(load_config(root / "teacher.yaml"))
    reset_accelerate()
    return model, root / "data"


def student_config(tmp_path: Path, teacher: tuple[Path, Path], *overrides: str):
    path = tmp_path / "student.yaml"
    path.write_text(STUDENT.format(out=tmp_path / "run", teacher=teacher[0], data=teacher[1]))
    return path, load_config(path, overrides)


def test_plan_is_a_function_of_the_shared_seed(tmp_path, teacher):
    _, config = student_config(tmp_path, teacher)
    sf = config.self_forcing
    plans = [plan_rollout(seed, sf, horizon=4, block=1, total=6) for seed in range(200)]
    assert plan_rollout(7, sf, 4, 1, 6) == plans[7]
    assert {p.window_start for p in plans} == {0, 1, 2}  # windows of 4 in 6 frames
    for plan in plans:
        assert len(plan.exit_rows) == plan.window_start + 4 - sf.context_frames  # blocks up to its end
        assert all(0 <= row < sf.steps for row in plan.exit_rows)
    assert {row for plan in plans for row in plan.exit_rows} == set(range(sf.steps))
    # the window always holds a generated frame, even with long context
    long = dataclasses.replace(sf, context_frames=4)
    assert all(plan_rollout(s, long, 4, 1, 6).window_start >= 1 for s in range(50))


def test_a_shared_exit_step_ends_every_block_at_one_row(tmp_path, teacher):
    """`exit: shared` (Self-Forcing's): one exit row for all generated blocks of a rollout, still drawn
    over every row, from the shared seed alone."""
    _, config = student_config(tmp_path, teacher, "self_forcing.exit=shared")
    sf = config.self_forcing
    plans = [plan_rollout(seed, sf, horizon=4, block=1, total=6) for seed in range(100)]
    assert all(len(set(plan.exit_rows)) == 1 for plan in plans)
    assert {plan.exit_rows[0] for plan in plans} == set(range(sf.steps))
    assert plan_rollout(7, sf, 4, 1, 6) == plans[7]


def test_the_critic_takes_its_own_optimiser_settings(tmp_path, teacher, monkeypatch):
    """Critic betas, weight decay and clipping from the self_forcing section; the generator keeps train's."""
    overrides = [
        "self_forcing.critic_betas=[0.0, 0.999]",
        "self_forcing.critic_weight_decay=0.01",
        "self_forcing.critic_max_grad_norm=10",
        "train.max_steps=1",
    ]
    _, config = student_config(tmp_path, teacher, *overrides)
    clipped = []
    step = engine.optimizer_step

    def spy(accelerator, model, optimizer, scheduler, cfg, *rest):
        group = optimizer.param_groups[0]
        clipped.append((tuple(group["betas"]), group["weight_decay"], cfg.max_grad_norm))
        return step(accelerator, model, optimizer, scheduler, cfg, *rest)

    monkeypatch.setattr(self_forcing, "optimizer_step", spy)
    train(config)
    generator, *critic = clipped  # one generator update, then critic_steps=2 critic updates
    assert generator == ((0.9, 0.99), 0.0, 1.0)
    assert critic == [((0.0, 0.999), 0.01, 10.0)] * 2


def test_training_rollout_is_the_inference_rollout(tmp_path, teacher):
    _, config = student_config(tmp_path, teacher)
    model, noise = load_model(teacher[0])
    schedule = noise.build()
    core = SelfForcing(dataclasses.replace(config, noise=noise), schedule, model, model)
    video = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    steps = config.self_forcing.steps
    plan = Plan(window_start=2, exit_rows=[steps - 1] * 5)  # every block runs all its steps
    with torch.no_grad():
        clip = core.rollout(model, {"video": video}, seed=3, plan=plan)
    reference = rollout(
        model,
        schedule,
        noise.parameterization,
        video[:, :1],
        5,
        steps=steps,
        shift=config.self_forcing.shift,
        generator=torch.Generator().manual_seed(3),
    )
    assert clip.shape == (2, 4, 3, 16, 16)
    torch.testing.assert_close(clip, reference[:, 2:], rtol=0, atol=1e-6)


def test_only_exit_steps_in_the_window_carry_gradient(tmp_path, teacher):
    _, config = student_config(tmp_path, teacher)
    model, noise = load_model(teacher[0])
    core = SelfForcing(dataclasses.replace(config, noise=noise), noise.build(), model, model)
    calls = []
    model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(out.requires_grad), with_kwargs=True
    )
    plan = Plan(window_start=2, exit_rows=[0, 2, 1, 0, 1])  # 5 generated blocks after 1 context frame
    clip = core.rollout(model, {"video": torch.zeros(1, 4, 3, 16, 16)}, seed=0, plan=plan)
    # 1 commit of context, then per block (exit row + 1) steps and a commit
    assert len(calls) == 1 + sum(row + 2 for row in plan.exit_rows)
    # the window is frames 2..5: the exit steps of the blocks of frames 2, 3, 4, 5, and nothing else
    assert [i for i, grad in enumerate(calls) if grad] == [5, 8, 10, 13]
    clip.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_training_rollout_with_a_sink_is_the_inference_rollout(tmp_path, teacher):
    """Past the horizon with the rolling cache and a permanent first frame, as long inference runs."""
    _, config = student_config(tmp_path, teacher, "self_forcing.sink=1", "self_forcing.rollout_frames=12")
    model, noise = load_model(teacher[0])
    core = SelfForcing(dataclasses.replace(config, noise=noise), noise.build(), model, model)
    video = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    plan = Plan(window_start=8, exit_rows=[2] * 11)
    with torch.no_grad():
        clip = core.rollout(model, {"video": video}, seed=5, plan=plan)
    kwargs = dict(steps=3, shift=2.0, generator=torch.Generator().manual_seed(5))
    reference = rollout(model, noise.build(), noise.parameterization, video[:, :1], 11, sink=1, **kwargs)
    torch.testing.assert_close(clip, reference[:, 8:], rtol=0, atol=1e-6)
    kwargs["generator"] = torch.Generator().manual_seed(5)
    without = rollout(model, noise.build(), noise.parameterization, video[:, :1], 11, **kwargs)
    assert (without[:, 8:] - clip).abs().max() > 1e-5  # the sink changes what the window sees


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_ode_pairs_lie_on_the_teachers_path(tmp_path, teacher, guidance):
    """The ODE init's targets are the teacher's own deterministic rollout through the generator's levels,
    queried as the distribution-matching stage queries it (with its history guidance), and each recorded
    state continues to the same clean frame."""
    overrides = ["self_forcing.ode_sampling_steps=5", f"self_forcing.guidance={guidance}"]
    _, config = student_config(tmp_path, teacher, *overrides)
    model, noise = load_model(teacher[0])
    schedule = noise.build()
    core = SelfForcing(dataclasses.replace(config, noise=noise), schedule, model, model)
    video = torch.rand(2, 4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        clip, states, levels = ode_pairs(core, model, {"video": video}, seed=1)
    assert levels.tolist() == core.matrix[:-1, 0].tolist() == [50, 40, 25]  # 3 steps, shift 2
    path = sorted({50, 40, 25, 0} | {50, 40, 30, 20, 10}, reverse=True)  # with 5 teacher steps
    matrix = torch.tensor(path)[:, None]  # [P, 1] one frame per chunk

    def reference(guidance: float) -> torch.Tensor:
        return rollout(
            model, schedule, noise.parameterization, video[:, :1], 3, scheduling=matrix,
            history_guidance=guidance, generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    torch.testing.assert_close(clip, reference(guidance), rtol=0, atol=1e-6)
    assert torch.equal(states[:, :, :1], video[None, :, :1].expand(3, -1, -1, -1, -1, -1))
    if guidance != 1:  # (its history-free branch draws noise too: the first draw is not the block's)
        assert (clip - reference(1.0)).abs().max() > 1e-4  # the guidance changes the targets
        return
    generator = torch.Generator().manual_seed(1)
    noise_frame = torch.randn(2, 1, 3, 16, 16, generator=generator)
    assert torch.equal(states[0, :, 1:2], noise_frame)  # level K: the block's starting noise


class GaussianPosterior(nn.Module):
    """E[x0 | x_t] for data N(mean, var) per pixel: an x0-parameterised denoiser, exact or learnable."""

    def __init__(self, schedule: NoiseSchedule, mean: float, log_var: float, learn: bool) -> None:
        super().__init__()
        self.schedule = schedule
        self.mean = nn.Parameter(torch.tensor(mean), requires_grad=learn)
        self.log_var = nn.Parameter(torch.tensor(log_var), requires_grad=learn)
        self.config = dataclasses.make_dataclass("C", [("num_classes", int, 0)])()

    def forward(self, sample, timesteps, **_):
        levels = (timesteps * self.schedule.levels / 1000).round().long()
        a, s = self.schedule._coefs(levels, sample.ndim, torch.float32)
        var = self.log_var.exp()
        return self.mean + a * var / (a**2 * var + s**2) * (sample - a * self.mean)


@pytest.mark.parametrize("level", [10, 20, 30])
def test_the_dmd_gradient_is_the_closed_form_in_expectation(tmp_path, teacher, level):
    """Gaussian toy: data N(mu, s^2), generator x = b + a z, teacher and critic the exact posterior means of
    the data's and the generator's Gaussians, one level t. Per element the DMD gradient is
    (x0_fake - x0_real) / c_t, c_t = E|x - x0_real| (over a frame of 1024 elements the normaliser is
    its expectation), whose expectation in b is (b - mu)(1 - alpha_t k_data) and in log a is
    a^2 alpha_t (k_fake - k_data), k = alpha_t v / (alpha_t^2 v + sigma_t^2); autograd through the loss
    matches both within 3% (up to level 30 of 50: above it the gradient in log a is small beside its
    Monte Carlo error)."""
    _, config = student_config(tmp_path, teacher)
    model, noise = load_model(teacher[0])
    schedule = NoiseSchedule.from_name("cosine", 50)
    config = dataclasses.replace(config, noise=dataclasses.replace(noise, parameterization="x0"))
    config.self_forcing.min_level = config.self_forcing.max_level = level
    core = SelfForcing(config, schedule, model, model)
    mu, data_var, b, a = 1.5, 0.25, 0.3, 0.8
    data = GaussianPosterior(schedule, mu, math.log(data_var), learn=False)
    critic = GaussianPosterior(schedule, b, math.log(a**2), learn=False)
    shift, log_scale = nn.Parameter(torch.tensor(b)), nn.Parameter(torch.tensor(math.log(a)))
    gen, draws, weight = torch.Generator().manual_seed(0), 20, None
    for seed in range(100, 100 + draws):  # the DMD noise's seeds, apart from the generator's z
        clip = shift + log_scale.exp() * torch.randn(64, 4, 1, 32, 32, generator=gen)
        loss, _ = core.distribution_matching(data, critic, clip, seed=seed, real=0, batch={})
        (loss / draws).backward()
        state = core.loss.draw(clip.detach(), seed)
        assert (state.levels == level).all()
        weight = state.weights.sum(1).mean()  # the frames' loss weights, summed over a clip
    alpha, sigma = (float(c) for c in schedule._coefs(torch.tensor([level]), 1, torch.float64))
    k_data = alpha * data_var / (alpha**2 * data_var + sigma**2)
    k_fake = alpha * a**2 / (alpha**2 * a**2 + sigma**2)
    mean = (1 - alpha * k_data) * (b - mu)  # x - x0_real ~ N(mean, var)
    std = math.sqrt((1 - alpha * k_data) ** 2 * a**2 + k_data**2 * sigma**2)
    normal = torch.distributions.Normal(0.0, 1.0)
    c = std * math.sqrt(2 / math.pi) * math.exp(-(mean**2) / (2 * std**2)) + mean * (
        1 - 2 * float(normal.cdf(torch.tensor(-mean / std)))
    )  # E|N(mean, std^2)|
    expected_b = float(weight) * (1 - alpha * k_data) * (b - mu) / c
    expected_log_a = float(weight) * a**2 * alpha * (k_fake - k_data) / c
    assert shift.grad.item() == pytest.approx(expected_b, rel=0.03)
    assert log_scale.grad.item() == pytest.approx(expected_log_a, rel=0.03)


@pytest.mark.parametrize(("weighting", "steps"), [("teacher", 800), ("independent", 1800)])
def test_distribution_matching_moves_a_gaussian_generator_to_the_data(tmp_path, teacher, weighting, steps):
    """1-D Gaussian toy: teacher = exact posterior of N(2, 0.25); the generator x = b + a z starts at
    N(0, 1); the critic, a Gaussian posterior trained with the denoising loss on generated samples,
    tracks it. The reverse KL's gradient moves the generator's mean and variance to the data's. (Under
    `independent` levels the variance first overshoots to ~3.5 and comes down slowly: at 800 steps the
    mean is 1.80, the variance 0.86; at 1800, 2.00 and 0.29.)"""
    _, config = student_config(tmp_path, teacher, f"self_forcing.weighting={weighting}")
    model, noise = load_model(teacher[0])
    schedule = NoiseSchedule.from_name("cosine", 50)
    config = dataclasses.replace(config, noise=dataclasses.replace(noise, parameterization="x0"))
    config.self_forcing.min_level, config.self_forcing.max_level = 2, 48
    core = SelfForcing(config, schedule, model, model)
    data_teacher = GaussianPosterior(schedule, 2.0, math.log(0.25), learn=False)
    critic = GaussianPosterior(schedule, 0.0, 0.0, learn=True)
    shift = nn.Parameter(torch.tensor(0.0))
    log_scale = nn.Parameter(torch.tensor(0.0))
    g_opt = torch.optim.Adam([shift, log_scale], lr=0.02)
    c_opt = torch.optim.Adam(critic.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        z = torch.randn(64, 4, 1, 1, 1, generator=gen)
        clip = shift + log_scale.exp() * z
        loss, _ = core.distribution_matching(data_teacher, critic, clip, seed=step, real=0, batch={})
        g_opt.zero_grad()
        loss.backward()
        g_opt.step()
        for update in range(5):
            fake = (shift + log_scale.exp() * torch.randn(64, 4, 1, 1, 1, generator=gen)).detach()
            c_opt.zero_grad()
            core.loss(critic, fake, seed=10_000 * step + update).loss.backward()
            c_opt.step()
    assert abs(shift.item() - 2.0) < 0.15
    assert abs(log_scale.exp().item() ** 2 - 0.25) < 0.08


def test_trains_and_resumes_exactly(tmp_path, teacher):
    """One ODE-regression step, then self-forcing; killed after step 2, rerun: bitwise the same step 4."""
    overrides = ["self_forcing.init=ode", "self_forcing.ode_steps=1", "train.max_steps=3"]
    path, config = student_config(tmp_path, teacher, *overrides)
    model = train(config)
    assert load_model(model)[1] == load_model(teacher[0])[1]  # exported with the teacher's schedule
    checkpoint = tmp_path / "run/checkpoints/step_00000004"
    # the generator, the critic and the exported generator EMA
    files = [checkpoint / "model.safetensors", checkpoint / "model_1.safetensors"]
    files.append(model / "diffusion_pytorch_model.safetensors")
    full = [load_file(f) for f in files]
    shutil.rmtree(checkpoint)  # as if killed after the step-2 checkpoint
    reset_accelerate()
    train(load_config(path, overrides))
    for before, file in zip(full, files, strict=True):
        again = load_file(file)
        assert before.keys() == again.keys()
        for key in before:
            assert torch.equal(before[key], again[key]), (file, key)


def test_a_generator_records_the_step_grid_it_was_trained_on(tmp_path, teacher, capsys):
    """The exported generator's sampling.json: autoregressive on its steps and shift, with its sink and
    context noise, so that `dforce sample` and `dforce eval` roll it out on the grid it was trained on."""
    overrides = ["train.max_steps=1", "self_forcing.sink=1", "self_forcing.context_noise=2"]
    _, config = student_config(tmp_path, teacher, *overrides)
    model = train(config)
    recipe = SamplingRecipe.load(model)
    assert recipe == SamplingRecipe(steps=3, shift=2.0, sink=1, context_noise=2, scheduling="autoregressive")
    net, noise = load_model(model)
    core = SelfForcing(config, noise.build(), net, net)
    matrix, window = chunk_schedule(net, noise.levels, **recipe.schedule_kwargs())
    assert torch.equal(matrix, core.matrix) and window == core.window  # the training rollout's grid
    main(["sample", "--model", str(model), "--frames", "2", "--out", str(tmp_path / "v.mp4")])
    assert "sampling: ddim, 3 steps, shift 2, autoregressive, context noise 2, sink 1 (from the model's" in (
        capsys.readouterr().out
    )


def test_config_errors(tmp_path, teacher):
    path, _ = student_config(tmp_path, teacher)
    with pytest.raises(ConfigError, match="objective self_forcing needs"):
        load_config(path, ["self_forcing=null"])
    with pytest.raises(ConfigError, match=r"self_forcing\.init: must be teacher or ode"):
        load_config(path, ["self_forcing.init=magic"])
    with pytest.raises(ConfigError, match="model: self-forcing takes the teacher"):
        train(load_config(path, ["model.num_layers=3"]))
    with pytest.raises(ConfigError, match="must be the teacher's horizon 4"):
        train(load_config(path, ["data.clip_frames=3"]))


SPY = """\
import sys
from pathlib import Path
from accelerate import PartialState
from safetensors.torch import save_file
import dforce.training.objectives.self_forcing as sf
import dforce.training.trainer as trainer

out = Path(sys.argv.pop(1))
plan_rollout, export_model = sf.plan_rollout, trainer.export_model


def spy_plan(seed, *args):
    plan = plan_rollout(seed, *args)
    with open(out / f"plans_{PartialState().process_index}.txt", "a") as f:
        f.write(f"{plan}\\n")
    return plan


def spy_export(accelerator, model, ema, config, directory, *rest):
    state = {k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    save_file(state, out / f"weights_{accelerator.process_index}.safetensors")
    export_model(accelerator, model, ema, config, directory, *rest)


sf.plan_rollout, trainer.export_model = spy_plan, spy_export
from dforce.cli import main

main()
"""


def test_two_processes_share_the_plan(tmp_path, teacher):
    """Two ranks over gloo: the same exit steps and windows on both, and the same generator after."""
    path, _ = student_config(tmp_path, teacher)
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    launch_two_processes(spy, str(tmp_path), "train", str(path), "train.max_steps=2", port=29519)
    plans = [(tmp_path / f"plans_{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(plans[0]) == 2 * 2  # 2 steps x (a generator rollout + a fresh critic rollout)
    assert plans[0] == plans[1]
    weights = [load_file(tmp_path / f"weights_{rank}.safetensors") for rank in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_the_rollout_the_dmd_state_and_the_critic_draw_independent_noise(tmp_path, teacher, monkeypatch):
    """Batch 1, no context: every normal draw of one training step, tagged by who drew it. No draw of the
    distribution-matching state or of the critic's loss repeats a draw of a rollout (same seed, same
    device, the same stream: the DMD noise would be the rollout's own starting noise)."""
    overrides = ["train.max_steps=1", "train.batch_size=1", "self_forcing.context_frames=0"]
    _, config = student_config(tmp_path, teacher, *overrides)
    draws, phase = [], ["other"]
    randn = torch.randn

    def recording(*args, **kwargs):
        out = randn(*args, **kwargs)
        draws.append((phase[0], out.detach().flatten().clone()))
        return out

    def tagged(name, method):
        def run(*args, **kwargs):
            before, phase[0] = phase[0], name
            try:
                return method(*args, **kwargs)
            finally:
                phase[0] = before

        return run

    monkeypatch.setattr(torch, "randn", recording)
    monkeypatch.setattr(SelfForcing, "rollout", tagged("rollout", SelfForcing.rollout))
    dmd = tagged("dmd", SelfForcing.distribution_matching)
    monkeypatch.setattr(SelfForcing, "distribution_matching", dmd)
    monkeypatch.setattr(DenoisingLoss, "__call__", tagged("critic", DenoisingLoss.__call__))
    train(config)
    rollouts = [d for name, d in draws if name == "rollout"]
    others = [(name, d) for name, d in draws if name in ("dmd", "critic")]
    assert rollouts and {name for name, _ in others} == {"dmd", "critic"}
    for name, drawn in others:
        for started in rollouts:
            n = min(len(started), len(drawn))
            assert not torch.equal(started[:n], drawn[:n]), f"the {name} noise repeats a rollout's"


def test_the_critic_schedule_counts_critic_updates(tmp_path, teacher, monkeypatch):
    """A linear schedule: after each generator step the critic, updated critic_steps times a step, is as
    far along its schedule as the generator is along its own."""
    overrides = ["train.lr_scheduler=linear", "self_forcing.critic_lr=1e-3"]
    _, config = student_config(tmp_path, teacher, *overrides)
    rates = []
    step = SelfForcingObjective.step

    def spy(objective, *args):
        norm = step(objective, *args)
        rates.append((objective.g_sched.get_last_lr()[0], objective.c_sched.get_last_lr()[0]))
        return norm

    monkeypatch.setattr(SelfForcingObjective, "step", spy)
    train(config)  # 4 steps of 2 critic updates
    assert [g / 1e-4 for g, _ in rates] == pytest.approx([0.75, 0.5, 0.25, 0.0])
    assert [c / 1e-3 for _, c in rates] == pytest.approx([0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("weighting", ["teacher", "sync"])
def test_every_frame_of_a_block_carries_dmd_and_critic_loss(tmp_path, teacher, weighting):
    """A teacher of blocks of 3 frames (Self-Forcing's): the staircase and the teacher layout per block
    (`teacher`), or one level per clip (`sync`, the default), so the DMD state and the critic's loss weight
    every frame of every block, each block at one level."""
    overrides = ["self_forcing.context_frames=3", "self_forcing.rollout_frames=9", "data.clip_frames=6"]
    _, config = student_config(tmp_path, teacher, *overrides, f"self_forcing.weighting={weighting}")
    net = CausalVideoTransformer(
        sample_size=16, patch_size=4, num_frames=6, frames_per_block=3, num_layers=1,
        num_attention_heads=2, attention_head_dim=8,
    )  # fmt: skip
    schedule = NoiseSchedule.from_name("cosine", 50)
    core = SelfForcing(config, schedule, net, net)
    assert core.loss.weighting.block == 3
    state = core.loss.draw(torch.rand(3, 6, 3, 16, 16) * 2 - 1, seed=0)
    assert (state.weights > 0).all()
    blocks = state.levels.unflatten(1, (2, 3))  # [B, block, frame]
    assert (blocks == blocks[:, :, :1]).all()
    if weighting == "teacher":
        assert core.loss.teacher_layout
        assert state.inputs["context"] is not None  # clean earlier blocks seen through the teacher layout
        assert (blocks[:, 0, 0] != blocks[:, 1, 0]).any()
    else:
        assert (state.levels == state.levels[:, :1]).all()
