import itertools

import pytest
import torch

from dforce.models.attention import (
    KVCache,
    Layout,
    attend,
    attention_mask,
    flex_block_mask,
    resolve_backend,
    sdpa_mask,
)

CPU = torch.device("cpu")


def brute_force_mask(layout: Layout) -> torch.Tensor:
    """The mask from its definition, one token pair at a time."""
    tokens, fpb = layout.tokens_per_frame, layout.frames_per_block
    keys = [(f, False) for f in range(layout.cached + layout.frames) for _ in range(tokens)]
    if layout.teacher:
        keys += [(f, True) for f in range(layout.frames) for _ in range(tokens)]
    queries = keys[layout.cached * tokens :]
    mask = torch.zeros(len(queries), len(keys), dtype=torch.bool)
    for (i, (qf, q_noisy)), (j, (kf, k_noisy)) in itertools.product(enumerate(queries), enumerate(keys)):
        qb, kb = qf // fpb, kf // fpb
        if not q_noisy:
            mask[i, j] = not k_noisy and kb <= qb  # block-causal over clean frames
        else:
            mask[i, j] = (not k_noisy and kb < qb) or (k_noisy and kb == qb)  # true past, own noisy block
    return mask


LAYOUTS = [
    Layout(frames=5, tokens_per_frame=3, frames_per_block=1),
    Layout(frames=6, tokens_per_frame=2, frames_per_block=2),
    Layout(frames=5, tokens_per_frame=2, frames_per_block=3),  # a partial last block
    Layout(frames=2, tokens_per_frame=3, frames_per_block=2, cached=4),
    Layout(frames=1, tokens_per_frame=3, frames_per_block=1, cached=3),
    Layout(frames=4, tokens_per_frame=2, frames_per_block=1, teacher=True),
    Layout(frames=4, tokens_per_frame=2, frames_per_block=2, teacher=True),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mask_matches_definition(layout):
    mask = sdpa_mask(layout, CPU)
    assert mask.shape == (layout.query_tokens, layout.key_tokens)
    assert torch.equal(mask, brute_force_mask(layout))


def test_block_causal_mask_structure():
    mask = sdpa_mask(Layout(frames=4, tokens_per_frame=1, frames_per_block=2), CPU)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_dense_layouts_have_no_masked_pair(layout):
    assert layout.dense == bool(sdpa_mask(layout, CPU).all())


def test_masks_are_built_once_per_layout():
    layout = Layout(frames=3, tokens_per_frame=4, frames_per_block=1)
    assert sdpa_mask(layout, CPU) is sdpa_mask(Layout(3, 4, 1), CPU)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_flex_and_sdpa_agree(layout):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, layout.query_tokens, 8, generator=generator)
    k, v = torch.randn(2, 2, 3, layout.key_tokens, 8, generator=generator)
    sdpa = attend(q, k, v, attention_mask(layout, CPU, "sdpa"))
    flex = attend(q, k, v, attention_mask(layout, CPU, "flex"))
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_flex_skips_masked_tiles():
    """8 frames x 64 tokens: 128-token tiles hold two frames, so the live tiles form a lower triangle."""
    layout = Layout(frames=8, tokens_per_frame=64)
    tiles = flex_block_mask(layout, CPU).to_dense()[0, 0]  # [4, 4]
    assert torch.equal(tiles.bool(), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    "layout",
    [
        Layout(frames=8, tokens_per_frame=64),
        Layout(frames=4, tokens_per_frame=64, frames_per_block=2, teacher=True),
    ],
    ids=str,
)
def test_flex_and_sdpa_agree_across_tiles(layout):
    q, k, v = torch.randn(3, 1, 2, layout.query_tokens, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        attend(q, k, v, attention_mask(layout, CPU, "flex")),
        attend(q, k, v, attention_mask(layout, CPU, "sdpa")),
    )


def test_backend_selection():
    assert resolve_backend("auto", CPU, needs_grad=True) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda"), needs_grad=True) == "flex"
    assert resolve_backend("flex", CPU, needs_grad=False) == "flex"
    with pytest.raises(ValueError, match="no backward on CPU"):
        resolve_backend("flex", CPU, needs_grad=True)
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        resolve_backend("xformers", CPU, needs_grad=False)


def test_teacher_layout_rejects_a_cache():
    with pytest.raises(ValueError, match="teacher-forcing"):
        Layout(frames=2, tokens_per_frame=1, teacher=True, cached=2)


def test_cache_rolls_whole_blocks():
    cache = KVCache(max_frames=4, frames_per_block=2)
    tokens = 3
    for step in range(4):
        keys = torch.full((1, 1, 2 * tokens, 1), float(step))  # two frames of block `step`
        for layer in range(2):
            assert (cache.get(layer) is None) == (step == 0)
            cache.append(layer, keys, -keys)
        cache.advance(2, tokens)
        assert cache.frames == min(4, 2 * (step + 1))
        assert cache.end == 2 * (step + 1)
    keys, values = cache.get(1)
    assert cache.start == 4
    assert keys.flatten().tolist() == [2.0] * 6 + [3.0] * 6
    assert torch.equal(values, -keys)
    cache.reset()
    assert cache.get(0) is None and cache.end == 0


def test_cache_keeps_its_sink_and_rolls_the_rest():
    cache = KVCache(max_frames=6, frames_per_block=2, sink_frames=2)
    tokens = 3
    for step in range(6):
        keys = torch.full((1, 1, 2 * tokens, 1), float(step))  # two frames of block `step`
        cache.append(0, keys, -keys)
        cache.advance(2, tokens)
    keys, values = cache.get(0)
    assert keys.flatten().tolist() == [0.0] * 6 + [4.0] * 6 + [5.0] * 6  # the sink, then the newest blocks
    assert torch.equal(values, -keys)
    assert (cache.frames, cache.start, cache.end) == (6, 8, 12)
    with pytest.raises(ValueError, match="sink_frames=1 must be a non-negative multiple"):
        KVCache(max_frames=4, frames_per_block=2, sink_frames=1)
    with pytest.raises(ValueError, match="sink_frames=6 exceeds max_frames=4"):
        KVCache(max_frames=4, sink_frames=6)


@pytest.mark.parametrize("sink_frames", [0, 1])
def test_cache_writes_in_place_and_rarely_moves(sink_frames):
    """A rollout of 100 frames through a 4-frame window: each frame is written once into the room after
    the cached ones, which `room` hands out as views of the buffer; the buffer is replaced only when
    the room runs out (a few times while it grows, then about once per window), not at every frame."""
    cache = KVCache(max_frames=4, sink_frames=sink_frames)
    buffers, frames = set(), []
    for frame in range(100):
        new = torch.full((2, 1, 3, 2), float(frame))  # [B, H, tokens, D]
        room = cache.room(0, batch=2, tokens=3)
        if room is None:
            cache.append(0, new, new)
        else:
            room[0][:, :, -3:], room[1][:, :, -3:] = new, new
            assert room[0].untyped_storage().data_ptr() == cache.keys[0].untyped_storage().data_ptr()
        buffers.add(cache.keys[0].data_ptr())
        cache.advance(1, tokens_per_frame=3)
        frames.append(cache.get(0)[0][0, 0, ::3, 0].tolist())
    assert frames[-1] == [0.0] * sink_frames + [96.0 + sink_frames + i for i in range(4 - sink_frames)]
    assert all(f == sorted(f) and len(f) == min(4, i + 1) for i, f in enumerate(frames))
    assert len(buffers) <= 100 // 4
    with pytest.raises(ValueError, match="holds a batch of 2, got 3"):
        cache.room(0, batch=3, tokens=3)


def test_cache_checks_blocks():
    with pytest.raises(ValueError, match="multiple of frames_per_block=2"):
        KVCache(max_frames=3, frames_per_block=2)
    cache = KVCache(max_frames=4, frames_per_block=2)
    with pytest.raises(ValueError, match="whole blocks of 2"):
        cache.advance(1, tokens_per_frame=1)
