import pytest
import torch

from dforce.models.model import CausalVideoTransformer

HORIZON = 6


def tiny(frames_per_block: int = 1, **options) -> CausalVideoTransformer:
    """A tiny model with every weight random: at its zero initialisation the output ignores the input."""
    config = dict(
        in_channels=3,
        sample_size=(8, 4),
        patch_size=2,
        num_frames=HORIZON,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        frames_per_block=frames_per_block,
    )
    model = CausalVideoTransformer(**(config | options))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def inputs(batch: int = 2, frames: int = HORIZON, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, 3, 8, 4, generator=generator)  # [B, T, C, H, W]
    timesteps = torch.randint(0, 1000, (batch, frames), generator=generator)  # [B, T]
    return sample, timesteps


def test_shapes_and_zero_initialisation():
    model = CausalVideoTransformer(
        in_channels=3, out_channels=5, sample_size=(8, 4), patch_size=2, num_frames=HORIZON,
        num_layers=1, num_attention_heads=2, attention_head_dim=8,
    )  # fmt: skip
    sample, timesteps = inputs(frames=4)
    out = model(sample, timesteps)
    assert out.shape == (2, 4, 5, 8, 4)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the model starts as the zero function


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_causality_is_exact(frames_per_block):
    """Changing every frame after block b, values and levels, leaves blocks <= b bitwise unchanged."""
    model = tiny(frames_per_block)
    sample, timesteps = inputs()
    with torch.no_grad():
        reference = model(sample, timesteps)
        for first_changed in range(frames_per_block, HORIZON, frames_per_block):
            other, other_t = inputs(seed=first_changed + 10)
            changed = torch.cat([sample[:, :first_changed], other[:, first_changed:]], dim=1)
            changed_t = torch.cat([timesteps[:, :first_changed], other_t[:, first_changed:]], dim=1)
            out = model(changed, changed_t)
            assert torch.equal(out[:, :first_changed], reference[:, :first_changed])
            assert not torch.allclose(out[:, first_changed:], reference[:, first_changed:])


def test_frames_within_a_block_see_each_other():
    model = tiny(frames_per_block=2)
    sample, timesteps = inputs()
    with torch.no_grad():
        reference = model(sample, timesteps)
        sample[:, 1] += 1.0
        assert not torch.allclose(model(sample, timesteps)[:, 0], reference[:, 0])


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_cache_equals_full_forward(frames_per_block):
    model = tiny(frames_per_block)
    sample, timesteps = inputs()
    cache = model.new_cache()
    with torch.no_grad():
        full = model(sample, timesteps)
        cached = []
        for start in range(0, HORIZON, frames_per_block):
            block = slice(start, start + frames_per_block)
            # Denoise a block against the cache without writing it, then write it at its final level.
            model(sample[:, block] * 2, timesteps[:, block] // 2, cache=cache)
            cached.append(model(sample[:, block], timesteps[:, block], cache=cache, update_cache=True))
    torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_rolling_cache_past_the_horizon(frames_per_block):
    """Past the horizon the cache drops its oldest blocks and keeps absolute positions. With one layer a
    frame's keys depend on that frame alone, so the rollout must equal recomputing the window at the
    same positions (`frame_offset`); deeper models keep each frame's keys as computed from its own window."""
    model = tiny(frames_per_block, num_layers=1)
    sample, timesteps = inputs(frames=3 * HORIZON)
    cache = model.new_cache()
    window = HORIZON - frames_per_block
    with torch.no_grad():
        for start in range(0, 3 * HORIZON, frames_per_block):
            block = slice(start, start + frames_per_block)
            out = model(sample[:, block], timesteps[:, block], cache=cache, update_cache=True)
            first = max(0, start - window)
            recomputed = model(
                sample[:, first : block.stop], timesteps[:, first : block.stop], frame_offset=first
            )
            torch.testing.assert_close(out, recomputed[:, -frames_per_block:], atol=1e-5, rtol=1e-5)
    assert cache.frames == window and cache.start == 3 * HORIZON - window


def test_sink_frames_keep_their_keys_and_positions():
    """One layer, so a frame's keys depend on that frame alone: past the horizon a rolling cache with a
    sink equals a cache that holds the sink and then only the newest frames, each at its own position."""
    model = tiny(num_layers=1)
    sample, timesteps = inputs(frames=3 * HORIZON)
    last = slice(3 * HORIZON - 1, 3 * HORIZON)
    rolling, plain, fresh = model.new_cache(sink_frames=2), model.new_cache(), model.new_cache(sink_frames=2)
    with torch.no_grad():
        for t in range(last.start):
            for cache in rolling, plain:
                model(sample[:, t : t + 1], timesteps[:, t : t + 1], cache=cache, update_cache=True)
        assert (rolling.frames, rolling.start, rolling.end) == (HORIZON - 1, last.start - 3, last.start)
        model(sample[:, :2], timesteps[:, :2], cache=fresh, update_cache=True)
        fresh.end = rolling.start  # skip the dropped frames
        window = slice(rolling.start, last.start)
        model(sample[:, window], timesteps[:, window], cache=fresh, update_cache=True)
        out = model(sample[:, last], timesteps[:, last], cache=rolling)
        torch.testing.assert_close(out, model(sample[:, last], timesteps[:, last], cache=fresh))
        assert not torch.allclose(out, model(sample[:, last], timesteps[:, last], cache=plain))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_through_a_cached_forward(checkpointing):
    """Self-forcing's pattern: frames enter the cache without grad, a forward with grad reads it and
    writes its own frame, and more frames roll the window (moving the sink, regrowing the buffer) before
    the backward. The gradient equals a full forward's (whose earlier frames ignore the last one), and
    the frames written after it match a rollout without grad."""
    model = tiny()
    if checkpointing:
        model.enable_gradient_checkpointing()
    sample, timesteps = inputs(frames=2 * HORIZON)
    new = slice(HORIZON - 1, HORIZON)
    x = sample[:, new].clone().requires_grad_()
    cache, reference = model.new_cache(sink_frames=1), model.new_cache(sink_frames=1)
    with torch.no_grad():
        for t in range(new.start):
            for c in cache, reference:
                model(sample[:, t : t + 1], timesteps[:, t : t + 1], cache=c, update_cache=True)
    out = model(x, timesteps[:, new], cache=cache, update_cache=True)
    with torch.no_grad():
        model(sample[:, new], timesteps[:, new], cache=reference, update_cache=True)
        later = [
            model(sample[:, t : t + 1], timesteps[:, t : t + 1], cache=c, update_cache=True)
            for t in range(new.stop, 2 * HORIZON)
            for c in (cache, reference)
        ]
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    full_x = sample[:, : new.stop].clone().requires_grad_()
    full = model(full_x, timesteps[:, : new.stop])[:, new]
    (full_grad,) = torch.autograd.grad(full.square().sum(), full_x)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, full_grad[:, new], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(later[0::2], later[1::2])
    assert not any(k.requires_grad for k in cache.keys.values())


def test_attention_depends_on_relative_time():
    model = tiny()
    sample, timesteps = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(sample, timesteps, frame_offset=1000), model(sample, timesteps), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_teacher_forcing_layout(frames_per_block):
    """Noisy block b in the layout == a block-causal forward on clean blocks < b then noisy block b."""
    model = tiny(frames_per_block)
    clean, _ = inputs(seed=2)
    noisy, timesteps = inputs(seed=3)
    with torch.no_grad():
        layout = model(noisy, timesteps, context=clean)
        for start in range(0, HORIZON, frames_per_block):
            stop = start + frames_per_block
            sample = torch.cat([clean[:, :start], noisy[:, start:stop]], dim=1)
            levels = torch.cat([torch.zeros_like(timesteps[:, :start]), timesteps[:, start:stop]], dim=1)
            alone = model(sample, levels)[:, start:]
            torch.testing.assert_close(layout[:, start:stop], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_backends_agree(frames_per_block):
    model = tiny(frames_per_block)
    sample, timesteps = inputs()
    context, _ = inputs(seed=4)
    outputs = {}
    with torch.no_grad():
        for backend in "sdpa", "flex":
            model.attention_backend = backend
            cache = model.new_cache()
            first = model(
                sample[:, :frames_per_block], timesteps[:, :frames_per_block], cache=cache, update_cache=True
            )
            second = model(sample[:, frames_per_block:], timesteps[:, frames_per_block:], cache=cache)
            outputs[backend] = (
                model(sample, timesteps),
                model(sample, timesteps, context=context),
                first,
                second,
            )
    for flex, sdpa in zip(outputs["flex"], outputs["sdpa"], strict=True):
        torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_flex_layers_compile_without_graph_breaks():
    """What a GPU run compiles by default: the layers with flex_attention and its block mask, traced whole
    (the training and teacher layouts). aot_eager runs the traced graph, as a GPU's inductor would compile
    it; inductor's CPU flex kernels are another code path."""
    model = tiny()
    sample, timesteps = inputs()
    context, _ = inputs(seed=4)
    with torch.no_grad():
        eager = model(sample, timesteps), model(sample, timesteps, context=context)
        model.attention_backend = "flex"
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = model(sample, timesteps), model(sample, timesteps, context=context)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(num_classes=3, action_dim=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = CausalVideoTransformer.from_pretrained(tmp_path).eval()
    sample, timesteps = inputs()
    labels, actions = torch.tensor([0, 2]), torch.randn(2, HORIZON, 2)
    with torch.no_grad():
        assert torch.equal(
            loaded(sample, timesteps, labels=labels, actions=actions),
            model(sample, timesteps, labels=labels, actions=actions),
        )


def test_every_parameter_gets_a_gradient():
    model = tiny(num_classes=3, action_dim=2).train()
    sample, timesteps = inputs()
    out = model(sample, timesteps, labels=torch.tensor([0, 1]), actions=torch.randn(2, HORIZON, 2))
    out.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    sample, timesteps = inputs()
    grads = []
    for checkpointing in False, True:
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        model(sample, timesteps).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, checkpointed)


def test_conditioning_changes_outputs():
    model = tiny(num_classes=3, action_dim=2)
    sample, timesteps = inputs()
    actions = torch.randn(2, HORIZON, 2)
    with torch.no_grad():
        base = model(sample, timesteps, labels=torch.tensor([0, 0]), actions=actions)
        other_label = model(sample, timesteps, labels=torch.tensor([1, 0]), actions=actions)
        assert not torch.allclose(other_label[0], base[0]) and torch.equal(other_label[1], base[1])
        no_label = model(sample, timesteps, actions=actions)  # the null label, for guidance
        assert not torch.allclose(no_label, base)
        actions[:, 3] += 1
        other_action = model(sample, timesteps, labels=torch.tensor([0, 0]), actions=actions)
        assert torch.equal(other_action[:, :3], base[:, :3]) and not torch.allclose(
            other_action[:, 3], base[:, 3]
        )
        timesteps[:, 2] += 100
        other_level = model(sample, timesteps, labels=torch.tensor([0, 0]), actions=actions)
        assert not torch.allclose(other_level[:, 2], other_action[:, 2])


def test_bf16_autocast():
    model = tiny()
    sample, timesteps = inputs()
    with torch.no_grad():
        reference = model(sample, timesteps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(sample, timesteps)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().mean() < 0.05 * reference.abs().mean()


def test_sizes_up_to_a_billion_parameters():
    with torch.device("meta"):
        model = CausalVideoTransformer(
            in_channels=16, sample_size=64, patch_size=2, num_frames=16,
            num_layers=24, num_attention_heads=24, attention_head_dim=64,
        )  # fmt: skip
    assert 0.9e9 < sum(p.numel() for p in model.parameters()) < 1.2e9


def test_bad_inputs_name_the_problem():
    model = tiny()
    sample, timesteps = inputs()
    with pytest.raises(ValueError, match="does not match the model"):
        model(sample[..., :2], timesteps)
    with pytest.raises(ValueError, match="timesteps"):
        model(sample, timesteps[:, :3])
    with pytest.raises(ValueError, match="training horizon num_frames=6"):
        model(torch.cat([sample, sample], 1), torch.cat([timesteps, timesteps], 1))
    with pytest.raises(ValueError, match="without num_classes"):
        model(sample, timesteps, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs a cache"):
        model(sample, timesteps, update_cache=True)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        CausalVideoTransformer(sample_size=7, patch_size=2)


def test_regional_compilation_matches_eager():
    """The layers compile without graph breaks (masks and rotary tables are built outside them)."""
    model = tiny()
    sample, timesteps = inputs()
    with torch.no_grad():
        eager = model(sample, timesteps)
        model.compile_repeated_blocks(fullgraph=True)
        torch.testing.assert_close(model(sample, timesteps), eager, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- text

TEXT_DIM = 16


def text(batch: int = 2, seed: int = 5, tokens: tuple[int, ...] = (3, 5)) -> dict[str, torch.Tensor]:
    """Text of `tokens[i]` real tokens out of 5 per clip, zero after them (the loader's padding)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.arange(5)[None] < torch.tensor(tokens[:batch])[:, None]  # [B, L]
    states = torch.randn(batch, 5, TEXT_DIM, generator=generator) * mask[..., None]  # [B, L, D]
    return {"encoder_hidden_states": states, "encoder_attention_mask": mask}


def test_text_starts_as_the_model_without_text():
    """The cross-attention's output projection starts at zero: a model with text computes what the same
    weights compute without it. Once it is not zero, no tokens (the null text) is still no text."""
    fresh = CausalVideoTransformer(num_frames=HORIZON, num_layers=2, text_dim=TEXT_DIM)
    assert all(torch.count_nonzero(block.cross.proj.weight) == 0 for block in fresh.blocks)
    model, plain = tiny(text_dim=TEXT_DIM), tiny()
    sample, timesteps = inputs()
    with torch.no_grad():
        conditioned = model(sample, timesteps, **text())
        assert not torch.allclose(conditioned, model(sample, timesteps))
        null = text(tokens=(0, 0))
        torch.testing.assert_close(model(sample, timesteps, **null), model(sample, timesteps))
        for block in model.blocks:
            block.cross.proj.weight.zero_(), block.cross.proj.bias.zero_()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert torch.equal(model(sample, timesteps, **text()), plain(sample, timesteps))


def test_text_conditioning_is_learned():
    """From the zero initialisation, a few AdamW steps make the output depend on the text."""
    torch.manual_seed(0)
    model = CausalVideoTransformer(
        in_channels=3, sample_size=(8, 4), patch_size=2, num_frames=HORIZON, num_layers=1,
        num_attention_heads=2, attention_head_dim=8, text_dim=TEXT_DIM,
    )  # fmt: skip
    sample, timesteps = (x[:1].expand(2, *x.shape[1:]) for x in inputs())  # two clips alike but the text
    prompts = text(tokens=(2, 4))
    target = torch.tensor([1.0, -1.0])[:, None, None, None, None].expand_as(sample)  # one per text
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        loss = (model(sample, timesteps, **prompts) - target).square().mean()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model(sample, timesteps, **prompts)
    assert loss < 0.5 and out[0].mean() > 0.3 and out[1].mean() < -0.3


@pytest.mark.parametrize("frames_per_block", [1, 2])
def test_causality_cache_and_teacher_layout_hold_with_text(frames_per_block):
    model = tiny(frames_per_block, text_dim=TEXT_DIM)
    sample, timesteps = inputs()
    clean, _ = inputs(seed=2)
    words = text()
    with torch.no_grad():
        full = model(sample, timesteps, **words)
        other, other_t = inputs(seed=12)
        first = frames_per_block
        changed = model(
            torch.cat([sample[:, :first], other[:, first:]], 1),
            torch.cat([timesteps[:, :first], other_t[:, first:]], 1),
            **words,
        )
        assert torch.equal(changed[:, :first], full[:, :first])
        cache, cached = model.new_cache(), []
        for start in range(0, HORIZON, frames_per_block):
            block = slice(start, start + frames_per_block)
            cached.append(
                model(sample[:, block], timesteps[:, block], cache=cache, update_cache=True, **words)
            )
        torch.testing.assert_close(torch.cat(cached, dim=1), full, atol=1e-5, rtol=1e-5)
        layout = model(sample, timesteps, context=clean, **words)
        start = HORIZON - frames_per_block
        alone = model(
            torch.cat([clean[:, :start], sample[:, start:]], 1),
            torch.cat([torch.zeros_like(timesteps[:, :start]), timesteps[:, start:]], 1),
            **words,
        )
        torch.testing.assert_close(layout[:, start:], alone[:, start:], atol=1e-5, rtol=1e-5)


def test_text_gets_gradients_and_bad_text_names_the_problem():
    model = tiny(text_dim=TEXT_DIM).train()
    model.enable_gradient_checkpointing()
    sample, timesteps = inputs()
    model(sample, timesteps, **text()).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    words = text()
    with pytest.raises(ValueError, match="built without text_dim"):
        tiny()(sample, timesteps, **words)
    with pytest.raises(ValueError, match=r"must be \[B, L, text_dim\] = \[2, L, 16\]"):
        model(sample, timesteps, encoder_hidden_states=words["encoder_hidden_states"][..., :8])
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(sample, timesteps, encoder_hidden_states=words["encoder_hidden_states"],
              encoder_attention_mask=words["encoder_attention_mask"][:, :3])  # fmt: skip


def test_a_rollouts_text_is_projected_once():
    """On a cache without grad (a rollout's forwards) each block's cross-attention keys and values of the
    text are made once and kept while the same text tensor comes back: the outputs are those of making
    them anew at every forward. With grad they are made anew, so the graph reaches the text's weights."""
    model = tiny(text_dim=TEXT_DIM)
    sample, timesteps = inputs()
    words = text()
    projections = []
    model.text_embed.register_forward_hook(lambda *_: projections.append(1))

    def copy(words: dict) -> dict:  # the same text in another tensor: made anew
        return {key: value.clone() for key, value in words.items()}

    with torch.no_grad():
        kept, anew = model.new_cache(), model.new_cache()
        for t in range(4):
            frame = sample[:, t : t + 1], timesteps[:, t : t + 1]
            out = model(*frame, cache=kept, **words)  # a denoising step, then the commit
            assert torch.equal(out, model(*frame, cache=anew, **copy(words)))
            with torch.enable_grad():
                torch.testing.assert_close(out, model(*frame, cache=kept, **words), rtol=1e-6, atol=1e-6)
            model(*frame, cache=kept, update_cache=True, **words)
            model(*frame, cache=anew, update_cache=True, **copy(words))
        assert len(projections) == 1 + 2 * 4 + 4  # once on `kept`; each call on `anew` and with grad
        other, frame = text(seed=6), (sample[:, 4:5], timesteps[:, 4:5])
        assert torch.equal(model(*frame, cache=kept, **other), model(*frame, cache=anew, **copy(other)))
    model(*frame, cache=kept, **words).square().sum().backward()
    assert model.text_embed.linear_1.weight.grad.abs().sum() > 0
