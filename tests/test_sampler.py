import functools
import itertools
import json

import pytest
import torch
from conftest import Terminal, pattern, write_video

from dforce.cli import main
from dforce.data.decode import decode_video
from dforce.data.loader import to_float
from dforce.data.text import Text
from dforce.diffusion.history import History
from dforce.diffusion.noise import NoiseConfig, NoiseSchedule
from dforce.diffusion.rollout import chunk_schedule, denoise_step, rollout
from dforce.diffusion.sampler import Sampler, ddim_step, ddpm_step, euler_step, renoise_step
from dforce.diffusion.scheduling import scheduling_matrix
from dforce.models.model import CausalVideoTransformer
from dforce.training.checkpoint import load_model

K = 1000
CUSTOM = [[K, K, K], [600, K, K], [0, 300, 900], [0, 0, 400], [0, 0, 0]]
SCHEDULES = {  # name: (scheduling, options); each chunk is 3 frames or less
    "autoregressive": ("autoregressive", {}),
    "chunked autoregressive": ("autoregressive", {"block": 3}),
    "pyramid": ("pyramid", {"chunk": 3}),
    "sync": ("sync", {"chunk": 3}),
    "custom": (CUSTOM, {}),
}


@functools.cache
def noise_schedule(name: str = "cosine") -> NoiseSchedule:
    return NoiseSchedule.from_name(name, K)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny(
    num_frames: int = 12, num_layers: int = 2, frames_per_block: int = 1, **options
) -> CausalVideoTransformer:
    """A tiny model with every weight random (at its zero initialisation the output ignores the input)."""
    model = CausalVideoTransformer(
        in_channels=3, sample_size=(8, 4), patch_size=2, num_frames=num_frames, num_layers=num_layers,
        num_attention_heads=2, attention_head_dim=8, frames_per_block=frames_per_block, **options,
    )  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen()) * 0.2)
    return model.eval()


def walk(
    schedule: NoiseSchedule, matrix: torch.Tensor, x: torch.Tensor, denoise, sampler: Sampler
) -> torch.Tensor:
    """Follow a scheduling matrix [S+1, T] from x [B, T, ...] with denoise(x, levels) -> (x0, eps)."""
    generator = gen(1)
    for levels, next_levels in itertools.pairwise(matrix):
        levels, next_levels = levels.expand(len(x), -1), next_levels.expand(len(x), -1)
        x0, eps = denoise(x, levels)
        x = sampler(schedule, x, x0, eps, levels, next_levels, generator)
    return x


# ----------------------------------------------------------------------------------------- step functions


ORACLE_CASES = [
    (schedule, parameterization, sampler, eta)
    for schedule, parameterizations, samplers in [
        ("cosine", ("eps", "x0", "v", "flow"), (("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0))),
        ("flow", ("x0", "v", "flow"), (("ddim", 0.0), ("ddpm", 0.0), ("euler", 0.0))),
    ]
    for parameterization in parameterizations
    for sampler, eta in samplers
]


@pytest.mark.parametrize("name,parameterization,sampler,eta", ORACLE_CASES)
def test_an_oracle_denoiser_recovers_the_data(name, parameterization, sampler, eta):
    """A denoiser that knows the clean frames, speaking any parameterisation, leads every sampler from pure
    noise to exactly those frames, along a pyramid in which the frames sit at different levels. float64:
    an eps prediction at level K carries 1/alpha_K ~ 2e4 times the rounding into x0."""
    schedule = noise_schedule(name)
    data = torch.rand(2, 4, 3, 4, 4, generator=gen(), dtype=torch.float64) * 2 - 1  # [B, T, C, H, W]

    def oracle(x, levels):
        a, s = schedule._coefs(levels, x.ndim)
        eps = (x - a * data) / s.clamp(min=1e-300)  # the noise that explains x given the data
        return schedule.to_x0_eps(
            schedule.target(data, eps, levels, parameterization), x, levels, parameterization
        )

    matrix = scheduling_matrix("pyramid", 4, K, steps=8, offset=2)
    noise = torch.randn(data.shape, generator=gen(2), dtype=torch.float64)
    out = walk(schedule, matrix, noise, oracle, Sampler(sampler, eta))
    torch.testing.assert_close(out, data, atol=1e-9, rtol=0)


def posterior_mean(schedule: NoiseSchedule, mean: torch.Tensor, std: torch.Tensor):
    """The exact denoiser for Gaussian data N(mean, std^2) per frame: E[x0 | x_k] and the eps it implies."""

    def denoise(x, levels):
        a, s = schedule._coefs(levels, x.ndim)
        gain = a * std**2 / (a**2 * std**2 + s**2)
        x0 = mean + gain * (x - a * mean)
        return x0, torch.where(s > 0, (x - a * x0) / s.clamp(min=1e-300), 0.0)

    return denoise


def gaussian_data(samples: int = 10000):
    mean = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1, 1)  # per frame
    std = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64).view(1, 3, 1, 1, 1)
    noise = torch.randn(samples, 3, 1, 1, 1, generator=gen(3), dtype=torch.float64)  # [N, T, 1, 1, 1]
    return mean, std, noise


def assert_gaussian(out: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Sample mean and variance within 4 standard errors of N(mean, var), per frame."""
    samples = len(out)
    z_mean = (out.mean(0) - mean[0]) / (var[0] / samples).sqrt()
    z_var = (out.var(0) - var[0]) / (var[0] * (2 / (samples - 1)) ** 0.5)
    assert z_mean.abs().max() < 4 and z_var.abs().max() < 4, (z_mean.flatten(), z_var.flatten())


@pytest.mark.parametrize("name,sampler", [("cosine", "ddpm"), ("flow", "euler")])
def test_samplers_with_the_exact_denoiser_match_gaussian_data(name, sampler):
    """With the exact posterior mean and one step per level, the ancestral sampler and the ODE one both
    reproduce the data distribution, frames at different levels (pyramid) in one batch."""
    schedule = noise_schedule(name)
    mean, std, noise = gaussian_data()
    matrix = scheduling_matrix("pyramid", 3, K, steps=K, offset=100)
    out = walk(schedule, matrix, noise, posterior_mean(schedule, mean, std), Sampler(sampler))
    assert_gaussian(out, mean, std**2)


def test_ddpm_with_few_steps_matches_its_known_distribution():
    """With 3 steps DDPM is still linear-Gaussian: x_j = c1 x_k + c0 + std z. Its output distribution,
    propagated here by plain Gaussian conditioning (Cov(x_j, x_k | x0) = alpha_k / alpha_j sigma_j^2), is
    narrower than the data's, and the samples must match it, not the data."""
    schedule = noise_schedule()
    mean, std, noise = gaussian_data()
    matrix = scheduling_matrix("sync", 3, K, steps=3)
    out = walk(schedule, matrix, noise, posterior_mean(schedule, mean, std), Sampler("ddpm"))
    m, v = torch.zeros_like(mean), torch.ones_like(mean)
    for k, j in itertools.pairwise(matrix[:, 0].tolist()):
        a_k, s_k, a_j, s_j = schedule.alpha[k], schedule.sigma[k], schedule.alpha[j], schedule.sigma[j]
        gain = a_k * std**2 / (a_k**2 * std**2 + s_k**2)  # x0_hat = mean (1 - gain a_k) + gain x_k
        r = a_k / a_j * s_j**2 / s_k**2  # regression of x_j on x_k given x0
        c1 = (a_j - r * a_k) * gain + r
        c0 = (a_j - r * a_k) * mean * (1 - gain * a_k)
        m, v = c0 + c1 * m, c1**2 * v + s_j**2 - r**2 * s_k**2
    assert (v < 0.95 * std**2).all()  # the test tells the two apart
    assert_gaussian(out, m, v)


def consistent_inputs(schedule: NoiseSchedule, seed: int = 0):
    """x at random levels, an x0 estimate and the eps that goes with it, and lower next levels."""
    generator = gen(seed)
    levels = torch.randint(1, K + 1, (3, 5), generator=generator)
    next_levels = (levels * torch.rand(levels.shape, generator=generator, dtype=torch.float64)).long()
    x0 = torch.randn(3, 5, 2, 4, 4, generator=generator, dtype=torch.float64)
    x = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    a, s = schedule._coefs(levels, x.ndim)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return x, x0, (x - a * x0) / s, levels, next_levels, noise


def test_ddpm_is_ddim_with_eta_one_and_euler_is_ddim_on_flow():
    x, x0, eps, levels, next_levels, noise = consistent_inputs(noise_schedule())
    torch.testing.assert_close(
        ddpm_step(noise_schedule(), x, x0, eps, levels, next_levels, noise),
        ddim_step(noise_schedule(), x, x0, eps, levels, next_levels, noise, eta=1.0),
    )
    x, x0, eps, levels, next_levels, _ = consistent_inputs(noise_schedule("flow"))
    torch.testing.assert_close(
        euler_step(noise_schedule("flow"), x, x0, eps, levels, next_levels),
        ddim_step(noise_schedule("flow"), x, x0, eps, levels, next_levels),
    )


@pytest.mark.parametrize(
    "step", [ddim_step, functools.partial(ddim_step, eta=0.7), ddpm_step, euler_step, renoise_step]
)
def test_frames_not_scheduled_to_move_are_untouched(step):
    """Frames whose level stays (clean ones included) come back bitwise, and the gradient stays finite
    even where the unused formula would divide by sigma_0 = 0."""
    schedule = noise_schedule("flow" if step is euler_step else "cosine")
    generator = gen(4)
    levels = torch.randint(0, K + 1, (4, 6), generator=generator)  # [B, T]
    levels[:, 0] = 0
    moving = torch.rand(levels.shape, generator=generator) < 0.5
    next_levels = torch.where(moving, levels // 2, levels)
    moving = next_levels != levels
    x, eps, noise = torch.randn(3, 4, 6, 3, 2, 2, generator=generator)  # [B, T, C, H, W] each
    x0 = torch.randn(x.shape, generator=generator).requires_grad_()
    out = step(schedule, x, x0, eps, levels, next_levels, noise)
    assert torch.equal(out[~moving], x[~moving])
    assert (out[moving] != x[moving]).all()
    out.sum().backward()
    assert torch.isfinite(x0.grad).all() and (x0.grad[~moving] == 0).all()


def test_renoise_is_the_clean_estimate_noised_afresh():
    """renoise: x_j = alpha_j x0 + sigma_j z, with nothing of x or eps. It is not a sampler of a plain
    denoiser's distribution: with the exact posterior mean and one step per level the samples' variance
    collapses (each last step returns a posterior mean), which is why it is a few-step generator's step."""
    schedule = noise_schedule("cosine")
    generator = gen(5)
    x, x0, eps, noise = torch.randn(4, 2, 3, 3, 2, 2, generator=generator)
    levels, next_levels = torch.full((2, 3), 700), torch.full((2, 3), 300)
    alpha, sigma = schedule._coefs(next_levels, x.ndim, torch.float64)
    expected = alpha.float() * x0 + sigma.float() * noise
    torch.testing.assert_close(renoise_step(schedule, x, x0, eps, levels, next_levels, noise), expected)
    assert Sampler("renoise").stochastic
    mean, std, start = gaussian_data()
    matrix = scheduling_matrix("sync", 3, K, steps=K)
    out = walk(schedule, matrix, start, posterior_mean(schedule, mean, std), Sampler("renoise"))
    assert (out.var(0) < 0.6 * std[0] ** 2).all()  # about half the data's variance


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        Sampler("heun")
    with pytest.raises(ValueError, match="eta is a ddim option"):
        Sampler("ddpm", eta=0.5)
    with pytest.raises(ValueError, match="needs a rectified-flow schedule"):
        Sampler("euler").check(noise_schedule())
    with pytest.raises(ValueError, match="needs noise"):
        ddpm_step(noise_schedule(), *consistent_inputs(noise_schedule())[:5])


# ------------------------------------------------------------------------------------------------ rollout


def sample(model, context, frames, scheduling="autoregressive", seed=0, **options):
    return rollout(model, noise_schedule(), "v", context, frames, scheduling=scheduling, steps=3,
                   generator=gen(seed), **options)  # fmt: skip


def clip(frames: int, batch: int = 2, seed: int = 5) -> torch.Tensor:
    return torch.rand(batch, frames, 3, 8, 4, generator=gen(seed)) * 2 - 1  # [B, T, C, H, W]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cache_equals_recompute_within_the_horizon(schedule):
    """Two layers, 2 context + 6 new frames (two chunks) in a 12-frame horizon: nothing leaves the window,
    so the KV-cached rollout equals recomputing the window at every step. Context noise on."""
    scheduling, options = SCHEDULES[schedule]
    model, context = tiny(), clip(2)
    cached = sample(model, context, 6, scheduling, context_noise=100, **options)
    recomputed = sample(model, context, 6, scheduling, context_noise=100, use_cache=False, **options)
    assert cached.shape == (2, 8, 3, 8, 4)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "schedule,frames_per_block",
    [(schedule, 1) for schedule in SCHEDULES] + [("autoregressive", 2), ("pyramid", 2)],
)
def test_cache_equals_recompute_past_the_horizon(schedule, frames_per_block):
    """One layer: a frame's keys depend on that frame alone, so the rolling cache equals the recomputed
    window however far past the 6-frame horizon (3x here), with the window sliding mid-chunk."""
    scheduling, options = SCHEDULES[schedule]
    if frames_per_block == 2:
        options = {**options, "chunk": 4} if "chunk" in options else options
    model, context = tiny(num_frames=6, num_layers=1, frames_per_block=frames_per_block), clip(2)
    cached = sample(model, context, 18, scheduling, **options)
    recomputed = sample(model, context, 18, scheduling, use_cache=False, **options)
    assert cached.shape == (2, 20, 3, 8, 4)
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames_per_block,frames", [(1, 31), (2, 31), (2, 4)])
def test_frames_and_shapes_past_the_horizon(frames_per_block, frames):
    """Any number of frames, many times the horizon, from no context or some: the context comes back
    bitwise, a last partial chunk or block is generated and cut, values stay finite."""
    model = tiny(num_frames=6, frames_per_block=frames_per_block)
    for context in clip(0, batch=3), clip(2, batch=3):
        video = sample(model, context, frames, "pyramid", chunk=4)
        assert video.shape == (3, context.shape[1] + frames, 3, 8, 4)
        assert torch.equal(video[:, : context.shape[1]], context) and torch.isfinite(video).all()


def test_the_same_seed_gives_the_same_video():
    model, context = tiny(num_frames=6), clip(2)
    options = dict(sampler="ddpm", context_noise=50, history_guidance=2.0)
    first, again = (sample(model, context, 8, seed=7, **options) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first[:, 2:], sample(model, context, 8, seed=8, **options)[:, 2:])


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_combines_the_branches(use_cache):
    """pred = c + (g - 1)(c - u_label) + (w - 1)(c - u_history): u_label has the null label and zero actions,
    u_history sees the committed frames at level K (with the same noise draw)."""
    model = tiny(num_classes=3, action_dim=2)
    context, x = clip(3), clip(2, seed=6)
    levels = torch.tensor([[500, 900], [200, 1000]])
    labels, actions = torch.tensor([0, 2]), torch.randn(2, 5, 2, generator=gen())

    def x0(labels=labels, actions=actions, **options):
        history = History(
            model, noise_schedule(), "v", 10, labels=labels, actions=actions, use_cache=use_cache, **options
        )
        history.commit(context, gen(9))
        with torch.no_grad():
            return history.denoise(x, levels)[0]

    guided = x0(guidance=2.5, history_guidance=1.5, context_noise=50)
    cond = x0(context_noise=50)
    no_label = x0(labels=torch.full_like(labels, 3), actions=torch.zeros_like(actions), context_noise=50)
    no_history = x0(context_noise=K)
    torch.testing.assert_close(guided, cond + 1.5 * (cond - no_label) + 0.5 * (cond - no_history))
    assert not torch.allclose(cond, no_label) and not torch.allclose(cond, no_history)


@pytest.mark.parametrize("use_cache", [True, False])
def test_text_guidance_is_linear_in_its_scale(use_cache):
    """Text guidance s: 1 is the text alone, 0 the null text alone (no tokens: the same as no text), and x0
    and eps move linearly with s; beside history guidance its term adds as the others do."""
    model = tiny(text_dim=4)
    context, x = clip(3), clip(2, seed=6)
    levels = torch.tensor([[500, 900], [200, 1000]])
    mask = torch.arange(5)[None] < torch.tensor([[3], [5]])  # [B, L]
    words = Text(torch.randn(2, 5, 4, generator=gen(3)) * mask[..., None], mask)

    def denoise(**options):
        history = History(model, noise_schedule(), "v", 10, use_cache=use_cache, **options)
        history.commit(context, gen(9))
        with torch.no_grad():
            return history.denoise(x, levels)

    cond, null = denoise(text=words), denoise(text=words.null())
    assert all(torch.equal(a, b) for a, b in zip(null, denoise(), strict=True))
    assert torch.equal(denoise(text=words, text_guidance=1.0)[0], cond[0])
    for scale in 0.0, 0.5, 3.0:
        for guided, c, u in zip(denoise(text=words, text_guidance=scale), cond, null, strict=True):
            torch.testing.assert_close(guided, scale * c + (1 - scale) * u, atol=1e-5, rtol=1e-5)
    both = denoise(text=words, text_guidance=2.0, history_guidance=1.5, context_noise=50)[0]
    c, no_text = denoise(text=words, context_noise=50)[0], denoise(text=words.null(), context_noise=50)[0]
    no_history = denoise(text=words, context_noise=K)[0]
    torch.testing.assert_close(both, c + (c - no_text) + 0.5 * (c - no_history), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond[0], null[0])
    with pytest.raises(ValueError, match="text guidance needs text"):
        denoise(text_guidance=2.0)
    with pytest.raises(ValueError, match="without text_dim"):
        History(tiny(), noise_schedule(), "v", 10, text=words)


def test_a_denoising_step_trains_and_commits_stay_detached():
    """What self-forcing needs: gradients through one step of a cached rollout, none through the cache."""
    model = tiny(num_frames=6).train()
    history = History(model, noise_schedule(), "v", 5)
    history.commit(clip(2))
    levels, next_levels = torch.tensor([[700], [300]]), torch.tensor([[400], [0]])
    x, x0 = denoise_step(history, clip(1, seed=6), levels, next_levels, Sampler("ddpm"), gen())
    (x.square().mean() + x0.square().mean()).backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())
    assert not any(k.requires_grad for k in history.cache.keys.values())


def test_bad_input_names_the_problem():
    model = tiny(num_frames=6)
    with pytest.raises(ValueError, match="unknown schedule 'spiral'"):
        sample(model, clip(1), 2, "spiral")
    with pytest.raises(ValueError, match="context has 6 frames but the model sees at most 5"):
        sample(model, clip(6), 2)
    with pytest.raises(ValueError, match=r"context must be \[B, T0, C, H, W\]"):
        sample(model, clip(2)[..., :2], 2)
    with pytest.raises(ValueError, match="multiple of frames_per_block=2"):
        sample(tiny(num_frames=6, frames_per_block=2), clip(1), 2)
    with pytest.raises(
        ValueError, match=r"chunk must be a multiple of frames_per_block=1 in 1\.\.num_frames=6"
    ):
        sample(model, clip(1), 2, "sync", chunk=7)
    with pytest.raises(ValueError, match="guidance needs labels or actions"):
        sample(model, clip(1), 2, guidance=2.0)
    with pytest.raises(ValueError, match="without num_classes"):
        sample(model, clip(1), 2, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"actions must be \[B, T0 \+ frames, A\] = \[2, 3, A\]"):
        sample(tiny(num_frames=6, action_dim=2), clip(1), 2, actions=torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"context_noise must be a level in 0\.\.1000"):
        sample(model, clip(1), 2, context_noise=1001)
    with pytest.raises(ValueError, match="rectified-flow"):
        sample(model, clip(1), 2, sampler="euler")


def test_window_leaves_room_for_the_frames_fed_at_once():
    model = tiny(num_frames=12, frames_per_block=2)
    # One frame at a time within a chunk of one model block: frame 0, then frame 1.
    assert chunk_schedule(model, K, "autoregressive", 4)[0].shape == (9, 2)
    assert chunk_schedule(model, K, "autoregressive", 4)[1] == 10
    matrix, window = chunk_schedule(model, K, "pyramid", 4, offset=1)  # chunk: half the horizon
    assert matrix.shape == (10, 6)  # 4 steps + 5 offsets
    assert window == 6  # when frames 0-4 move at once, 6 frames (whole blocks) are fed


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny(num_frames=6, num_classes=3).save_pretrained(path)
    NoiseConfig(schedule="cosine", levels=K, parameterization="v").save(path)
    return path


def test_load_model(model_dir, tmp_path):
    model, noise = load_model(model_dir)
    assert model.config.num_frames == 6 and not model.training and noise.parameterization == "v"
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_model(tmp_path)


def test_cli_continues_a_video_and_shows_it_beside_the_real_one(model_dir, tmp_path, monkeypatch):
    """Context from a 16x32 video the test encodes (resized and cropped to the model's 8x4), 2 frames of
    context + 4 new; the same seed writes the same files."""
    terminal = Terminal()  # the progress bar shows on a terminal only
    monkeypatch.setattr("sys.stderr", terminal)
    source = tmp_path / "real.mp4"
    write_video(source, pattern(12, 16, 32))
    outputs = []
    for run in "ab":
        out = tmp_path / run / "video.mp4"
        main(["sample", "--model", str(model_dir), "--frames", "4", "--context", str(source),
              "--context-frames", "2", "--steps", "2", "--schedule", "pyramid", "--chunk", "2", "--label",
              "1", "--guidance", "2", "--seed", "3", "--scale", "2", "--out", str(out)])  # fmt: skip
        outputs.append([out.read_bytes(), out.with_suffix(".gif").read_bytes()])
    assert "rollout" in terminal.getvalue()  # the progress bar
    assert outputs[0] == outputs[1]
    video = decode_video(outputs[0][0])  # [T, C, H, W]
    assert video.shape == (6, 3, 16, 8)
    real = decode_video((tmp_path / "a/video_vs_real.mp4").read_bytes())
    assert real.shape == (6, 3, 16, 16)
    # The left half of the side-by-side is the generated video; the context frames of both match.
    assert (to_float(real[..., :8]) - to_float(video)).abs().mean() < 0.05
    assert (to_float(real[:2, :, :, 8:]) - to_float(real[:2, :, :, :8])).abs().mean() < 0.05
    assert (tmp_path / "a/video_vs_real.gif").is_file()


def test_cli_unconditional_custom_schedule_from_shards(model_dir, tmp_path, index_shards):
    (tmp_path / "matrix.json").write_text(json.dumps(CUSTOM))
    out = tmp_path / "video.mp4"
    main(["sample", "--model", str(model_dir), "--frames", "7", "--schedule", str(tmp_path / "matrix.json"),
          "--no-cache", "--sampler", "ddpm", "--out", str(out)])  # fmt: skip
    assert decode_video(out.read_bytes()).shape == (7, 3, 8, 4)
    main(["sample", "--model", str(model_dir), "--frames", "2", "--steps", "2", "--context", index_shards[0],
          "--context-index", "2", "--out", str(out)])  # fmt: skip
    assert decode_video(out.read_bytes()).shape == (7, 3, 8, 4)  # the window holds 5 frames of context


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--model", "MISSING"], "MISSING: no config.json"),
        (["--schedule", "spiral"], "unknown schedule 'spiral'"),
        (["--out", "video.avi"], "must be a .mp4 file"),
        (["--context", "REAL", "--context-frames", "6"], "context has 6 frames but the model sees at most 5"),
        (["--context", "REAL", "--context-frames", "20"], "has only 12 frames"),
        (["--context", "missing.mp4"], "missing.mp4: no such video file"),
        (["--guidance", "3"], "guidance needs labels"),
    ],
)
def test_cli_errors_are_one_line(model_dir, tmp_path, arguments, message):
    source = tmp_path / "real.mp4"
    write_video(source, pattern(12, 16, 32))
    defaults = {"--model": str(model_dir), "--frames": "2", "--steps": "1", "--out": str(tmp_path / "v.mp4")}
    options = dict(zip(arguments[::2], arguments[1::2], strict=True))
    options = {
        key: str(source) if value == "REAL" else value for key, value in {**defaults, **options}.items()
    }
    with pytest.raises(SystemExit, match=message):
        main(["sample", *itertools.chain.from_iterable(options.items())])
