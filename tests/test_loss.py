import pytest
import torch

from dforce.data.text import Text
from dforce.diffusion.loss import DenoisingLoss
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.trajectory import get_weighting
from dforce.models.model import CausalVideoTransformer

FRAMES, LEVELS = 4, 20


def tiny_model(**options) -> CausalVideoTransformer:
    torch.manual_seed(0)
    model = CausalVideoTransformer(
        sample_size=8,
        patch_size=4,
        num_frames=FRAMES,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        **options,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # the DiT init is the zero function; any non-trivial model will do
    return model.eval()


def make_loss(weighting: str, **options) -> DenoisingLoss:
    schedule = NoiseSchedule.from_name("cosine", LEVELS)
    return DenoisingLoss(schedule, "v", get_weighting(weighting, FRAMES, LEVELS), **options)


def clips(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, FRAMES, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_seeded_and_reproducible():
    model, x0, loss = tiny_model(), clips(), make_loss("paths")
    a, b, c = loss(model, x0, seed=5), loss(model, x0, seed=5), loss(model, x0, seed=6)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.levels, b.levels)
    assert not torch.equal(a.loss, c.loss)
    assert a.error.shape == a.levels.shape == a.trained.shape == (3, FRAMES)
    assert (a.levels[~a.trained] == 0).all()  # paths: frames without loss are clean context


@pytest.mark.parametrize("block", [1, 2])
@torch.no_grad()
def test_teacher_layout_is_every_staircase_state_at_once(block):
    """One teacher-layout forward = the mean over blocks J of the loss at block J's staircase state
    (blocks before J clean, block J at its one level, blocks after J pure noise): per frame with one frame
    per block, per block of 2 frames with `frames_per_block=2`."""
    model, x0, schedule = (
        tiny_model(frames_per_block=block),
        clips(),
        NoiseSchedule.from_name("cosine", LEVELS),
    )
    loss = DenoisingLoss(schedule, "v", get_weighting("teacher", FRAMES, LEVELS, frames_per_block=block))
    assert loss.teacher_layout
    out = loss(model, x0, seed=11)
    assert (out.levels.view(-1, FRAMES // block, block) == out.levels[:, ::block, None]).all()  # per block
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))  # the loss's first draw
    per_frame = []
    for start in range(0, FRAMES, block):
        frames = slice(start, start + block)
        levels = torch.full_like(out.levels, LEVELS)  # after the block: pure noise (unseen by it)
        levels[:, :start] = 0
        levels[:, frames] = out.levels[:, frames]
        x_t = schedule.add_noise(x0, noise, levels)
        pred = model(x_t, schedule.timesteps(levels))[:, frames]
        target = schedule.target(x0, noise, levels, "v")[:, frames]
        per_frame.append((pred - target).square().mean(dim=(2, 3, 4)))
    expected = torch.cat(per_frame, 1)  # [B, T]
    torch.testing.assert_close(out.error, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, expected.mean(1).mean(), rtol=1e-4, atol=1e-6)
    assert not make_loss("teacher", teacher_layout=False).teacher_layout


def test_level_weight_scales_each_frame():
    model, x0 = tiny_model(), clips()
    plain, elbo = (
        make_loss("independent")(model, x0, seed=2),
        make_loss("independent", level_weight="elbo")(model, x0, seed=2),
    )
    weight = NoiseSchedule.from_name("cosine", LEVELS).loss_weight("elbo", plain.levels, "v").float()
    torch.testing.assert_close(elbo.error, plain.error * weight)
    with pytest.raises(ValueError, match="unknown loss weighting 'bogus'"):
        make_loss("paths", level_weight="bogus")


class Spy(torch.nn.Module):
    """Records what the model is shown; predicts zeros."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.null_label = num_classes  # the `Backbone` interface's "no label" id
        self.calls = []

    def forward(self, sample, timesteps, **extra):
        self.calls.append({"sample": sample, "timesteps": timesteps, **extra})
        return torch.zeros_like(sample)


@pytest.mark.parametrize("weighting", ["independent", "teacher"])
def test_dropping_history_and_labels(weighting):
    x0, labels = clips(64), torch.arange(64) % 5
    spy = Spy()
    kept = make_loss(weighting)(spy, x0, seed=0, labels=labels)
    assert torch.equal(spy.calls[-1]["labels"], labels)
    dropped = make_loss(weighting, drop_history=1.0, drop_labels=1.0)(spy, x0, seed=0, labels=labels)
    call = spy.calls[-1]
    assert (call["labels"] == 5).all()  # the null label
    if weighting == "teacher":
        assert (call["context_timesteps"] == 1000).all()  # context at level K, told as t = 1
        assert (kept.levels == dropped.levels).all()
    else:
        context = ~dropped.trained
        assert context.any() and (dropped.levels[context] == LEVELS).all()
        assert torch.equal(dropped.levels[~context], kept.levels[~context])
    half = make_loss(weighting, drop_labels=0.5)(spy, x0, seed=0, labels=labels)
    assert 10 < (spy.calls[-1]["labels"] == 5).sum() < 54
    assert half.loss.isfinite()


def test_wrong_clip_length():
    with pytest.raises(ValueError, match="clips have 3 frames but the weighting was built for 4"):
        make_loss("paths")(tiny_model(), clips()[:, :3], seed=0)


def test_context_noise_in_the_teacher_layout():
    spy, x0 = Spy(), clips(64)
    make_loss("teacher", context_noise=7)(spy, x0, seed=0)
    context_t = spy.calls[-1]["context_timesteps"]  # t * 1000 = level * 50
    assert context_t.min() == 0 and context_t.max() == 7 * 1000 / LEVELS
    assert len(context_t.unique()) == 8  # every level in 0..7 is drawn
    make_loss("teacher")(spy, x0, seed=0)
    assert (spy.calls[-1]["context_timesteps"] == 0).all()
    with pytest.raises(ValueError, match="context_noise is for the teacher layout"):
        make_loss("paths", context_noise=7)
    with pytest.raises(ValueError, match=r"context_noise must be a level in 0\.\.20"):
        make_loss("teacher", context_noise=21)


@pytest.mark.parametrize("weighting", ["independent", "teacher"])
def test_dropping_text(weighting):
    """Each clip's text becomes the null text (no tokens, zero embeddings) with chance drop_text; the
    other draws, and the kept texts, are those of the loss without it."""
    n = 4000
    x0 = torch.zeros(n, FRAMES, 1, 1, 1)
    states = torch.randn(n, 3, 2, generator=torch.Generator().manual_seed(2))  # [B, L, D]
    words = Text(states, torch.ones(n, 3, dtype=torch.bool))
    spy = Spy()
    kept = make_loss(weighting)(spy, x0, seed=0, text=words)
    assert torch.equal(spy.calls[-1]["encoder_hidden_states"], states)
    dropped = make_loss(weighting, drop_text=0.3)(spy, x0, seed=0, text=words)
    call = spy.calls[-1]
    null = ~call["encoder_attention_mask"].any(1)  # [B]
    assert abs(null.float().mean() - 0.3) < 0.03  # 3 standard deviations: 0.022
    assert (call["encoder_hidden_states"][null] == 0).all()
    assert torch.equal(call["encoder_hidden_states"][~null], states[~null])
    assert call["encoder_attention_mask"][~null].all()
    assert torch.equal(kept.levels, dropped.levels)
    again = make_loss(weighting, drop_text=0.3)(spy, x0, seed=0, text=words)
    assert torch.equal(spy.calls[-1]["encoder_attention_mask"], call["encoder_attention_mask"])
    assert torch.equal(again.levels, dropped.levels)


def test_a_level_shift_warps_the_levels_that_carry_loss():
    """`level_shift` s maps each drawn level k to round(K s t / (1 + (s - 1) t)), t = k / K (self-forcing's
    DMD levels, Self-Forcing's shift 5), before `level_range` clamps; the rest of the draw is unchanged."""
    schedule, x0 = NoiseSchedule.from_name("cosine", 50), torch.rand(64, 4, 3, 8, 8)
    weighting = get_weighting("sync", 4, 50)
    plain = DenoisingLoss(schedule, "x0", weighting).draw(x0, seed=3)
    shifted = DenoisingLoss(schedule, "x0", weighting, level_shift=5.0, level_range=(2, 48)).draw(x0, seed=3)
    t = plain.levels.double() / 50
    expected = (5 * t / (1 + 4 * t) * 50).round().long().clamp(2, 48)
    assert torch.equal(shifted.levels, expected)
    assert shifted.levels.float().mean() > plain.levels.float().mean() + 5
    assert torch.equal(shifted.noise, plain.noise)
