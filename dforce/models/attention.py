"""Block-causal attention over frames: masks, two backends with identical results, and the KV cache.

Every token belongs to a frame, every frame to a causal block of `frames_per_block` frames. A token
sees every token of its own block and of earlier blocks. One rule (`_visible`) decides this for both
backends: SDPA with a boolean mask (CPU, and anywhere as the fallback) and flex_attention with a
`BlockMask` (GPU; skips fully masked tiles, compiles). Masks are built once per `Layout` and cached.

Teacher-forcing layout: the sequence is `T` context frames followed by the same `T` frames noised.
Context frames attend block-causally among themselves; noisy frame `t` sees the context blocks before
its own block and the noisy frames of its own block. One forward so trains every frame of the
teacher-forcing staircase, each conditioned on the true past.

KV cache, for rollout (see `KVCache`): feed frames a block at a time; each call attends to the cached
keys and values of earlier blocks plus its own. Pass `update_cache=True` to the model when a block is
fed at its final level (clean, or the context-noise level) and its keys and values are appended. The
cache keeps at most `max_frames` frames, dropping the oldest whole blocks, so a rollout runs far past
the training horizon at constant cost per frame. Keys are stored after the rotary embedding at their
absolute frame positions; attention depends only on differences of positions, so the window behaves the
same at frame 10 000 as at frame 10. Each cached frame keeps the keys it got from its own window: in a
one-layer model this equals recomputing the current window, in a deeper one it is the rolling-cache
rollout itself (within the horizon, cache and full forward agree exactly).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

T = TypeVar("T")
Backend = Literal["auto", "sdpa", "flex"]
BACKENDS = ("auto", "sdpa", "flex")


@dataclass(frozen=True)
class Layout:
    """The token layout of one attention call; hashable, so its masks are built once and reused.

    `frames` are the frames fed in this call (in the teacher layout: the number of context frames, with
    as many noisy frames after them); `cached` frames precede them in the KV cache. Blocks count from
    the first key frame, which the cache keeps on a block boundary.
    """

    frames: int
    tokens_per_frame: int
    frames_per_block: int = 1
    cached: int = 0
    teacher: bool = False

    def __post_init__(self) -> None:
        if self.teacher and self.cached:
            raise ValueError("the teacher-forcing layout does not read a KV cache")

    @property
    def dense(self) -> bool:
        """Every query sees every key: one block of queries after whole cached blocks (a rollout step)."""
        return not self.teacher and self.frames <= self.frames_per_block

    @property
    def query_tokens(self) -> int:
        return self.frames * self.tokens_per_frame * (2 if self.teacher else 1)

    @property
    def key_tokens(self) -> int:
        return self.query_tokens + self.cached * self.tokens_per_frame

    def tokens(
        self, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query block, query noisy, key block, key noisy) per token, all [L] on `device`."""
        frame = torch.arange(self.cached + self.frames, device=device)
        block = (frame // self.frames_per_block).repeat_interleave(self.tokens_per_frame)  # [Lk]
        noisy = torch.zeros_like(block, dtype=torch.bool)
        if self.teacher:
            block = torch.cat([block, block])
            noisy = torch.cat([noisy, ~noisy])
        queries = slice(self.cached * self.tokens_per_frame, None)
        return block[queries], noisy[queries], block, noisy


def _visible(q_block: torch.Tensor, q_noisy: torch.Tensor, k_block: torch.Tensor, k_noisy: torch.Tensor):
    """Whether a query token may attend to a key token (broadcasts; also used inside flex's mask_mod)."""
    clean_query = ~k_noisy & (k_block <= q_block)
    noisy_query = (~k_noisy & (k_block < q_block)) | (k_noisy & (k_block == q_block))
    return torch.where(q_noisy, noisy_query, clean_query)


@functools.lru_cache(maxsize=64)
def sdpa_mask(layout: Layout, device: torch.device) -> torch.Tensor:
    """Boolean mask [Lq, Lk], True where attention is allowed."""
    q_block, q_noisy, k_block, k_noisy = layout.tokens(device)
    return _visible(q_block[:, None], q_noisy[:, None], k_block[None, :], k_noisy[None, :])


@functools.lru_cache(maxsize=64)
def flex_block_mask(layout: Layout, device: torch.device) -> BlockMask:
    """The same mask as a flex_attention `BlockMask`, whose fully masked tiles are skipped."""
    q_block, q_noisy, k_block, k_noisy = layout.tokens(device)

    def mask_mod(b, h, q, k):
        return _visible(q_block[q], q_noisy[q], k_block[k], k_noisy[k])

    return create_block_mask(mask_mod, None, None, layout.query_tokens, layout.key_tokens, device=device)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def resolve_backend(backend: Backend, device: torch.device, needs_grad: bool) -> str:
    """`auto` picks flex_attention on GPU and SDPA elsewhere; flex has no backward on CPU (torch 2.13)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if backend == "flex" and device.type == "cpu" and needs_grad:
        raise ValueError("attention backend 'flex' has no backward on CPU; use 'sdpa' (or 'auto') to train")
    return backend


def attention_mask(
    layout: Layout, device: torch.device, backend: Backend = "auto", needs_grad: bool = False
) -> torch.Tensor | BlockMask | None:
    """The mask `attend` takes: a boolean tensor for SDPA, a `BlockMask` for flex, None if dense.

    Built outside the layers (once per forward, cached per layout) so a compiled layer sees a plain input.
    """
    backend = resolve_backend(backend, device, needs_grad)
    if layout.dense:  # no mask: SDPA can use its fastest kernel, and flex would only recompile per shape
        return None
    return sdpa_mask(layout, device) if backend == "sdpa" else flex_block_mask(layout, device)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None
) -> torch.Tensor:
    """Masked attention. q [B, H, Lq, D], k and v [B, H, Lk, D] -> [B, H, Lq, D]."""
    if not isinstance(mask, BlockMask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if torch.compiler.is_compiling():  # inside a compiled model (`train.compile`): part of its graph
        return flex_attention(q, k, v, block_mask=mask)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=mask)
    with warnings.catch_warnings():  # uncompiled flex on CPU is a slow reference path; it warns each call
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=mask)


@dataclass(frozen=True)
class Past:
    """One layer's cached keys and values for one forward (`KVCache.past`); no cache: `Past()`."""

    kv: tuple[torch.Tensor, torch.Tensor] | None = None  # keys, values [B, H, L', d]
    in_place: bool = False  # `kv` is the cache's buffer ending in room for this call's keys and values

    def join(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values to attend to: the cached ones, then this call's k, v [B, H, L, d] (written
        into the room in place, or concatenated)."""
        if self.kv is None:
            return k, v
        if not self.in_place:
            return torch.cat([self.kv[0], k], dim=2), torch.cat([self.kv[1], v], dim=2)
        keys, values = self.kv
        keys[:, :, -k.shape[2] :], values[:, :, -v.shape[2] :] = k, v
        return keys, values


class KVCache:
    """Keys and values of finished frames, per layer, in a window of at most `max_frames` frames.

    Preallocated: each layer's keys and values live in one buffer [B, H, capacity, D] with room after the
    cached tokens. A forward writes only its own keys and values into that room (`room`, or `append`)
    and attention reads the cache where it lies: nothing is concatenated. Dropping the oldest blocks
    moves the index of the first cached token; when the room runs out, the cached tokens move to the
    front of a buffer of twice the need, about once per window of frames.

    `sink_frames` (whole blocks, counted in `max_frames`) are the first frames written; they are never
    dropped and the window rolls over the frames after them. Keys are stored after the rotary embedding,
    so a sink keeps the positions it was written at (0, 1, ...): far past the horizon the newest frame
    sees it at distances the model never trained on; nothing re-encodes them.

    `end` is the absolute index of the next frame to feed (the model places new frames there), `start`
    that of the oldest frame the window can still drop (the oldest cached frame after the sink). A forward
    with `update_cache=True` stages each layer's keys and values, then `advance` commits them and drops
    the oldest blocks after the sink. Views from `get` and `room` are valid until the next `advance`.
    A layer reads the cache through `past` (every backbone the same way); `cross` keeps what does not
    change with the frames, the cross-attention keys and values of a rollout's text.
    """

    def __init__(self, max_frames: int, frames_per_block: int = 1, sink_frames: int = 0) -> None:
        for name, frames in ("max_frames", max_frames), ("sink_frames", sink_frames):
            if frames < 0 or frames % frames_per_block:
                raise ValueError(
                    f"KVCache {name}={frames} must be a non-negative multiple of "
                    f"frames_per_block={frames_per_block}"
                )
        if sink_frames > max_frames:
            raise ValueError(f"KVCache sink_frames={sink_frames} exceeds max_frames={max_frames}")
        self.max_frames, self.frames_per_block, self.sink_frames = max_frames, frames_per_block, sink_frames
        self.keys: dict[int, torch.Tensor] = {}  # layer -> buffer [B, H, capacity, D]
        self.values: dict[int, torch.Tensor] = {}
        self.heads: dict[int, int] = {}  # layer -> buffer index of its first cached token
        self.frames = 0  # cached frames, the sink included
        self.tokens = 0  # cached tokens in each layer
        self.end = 0
        self.cross_source: torch.Tensor | None = None  # what `cross_values` were made from
        self.cross_values: Any = None

    @property
    def start(self) -> int:
        return self.end - self.frames + min(self.frames, self.sink_frames)

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached keys and values [B, H, tokens, D] (views), or None while the cache is empty."""
        if not self.tokens:
            return None
        cached = slice(self.heads[layer], self.heads[layer] + self.tokens)
        return self.keys[layer][:, :, cached], self.values[layer][:, :, cached]

    def room(self, layer: int, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views [B, H, cached + tokens, D] of the layer's buffers: the cached keys and values, then room
        for `tokens` new ones, which the caller writes (staging them for `advance`). None before the
        layer's first `append`, which sets the buffers' shape and dtype."""
        if layer not in self.keys:
            return None
        if self.keys[layer].shape[0] != batch:
            raise ValueError(
                f"the KV cache holds a batch of {self.keys[layer].shape[0]}, got {batch}; reset() it first"
            )
        span = self._span(layer, tokens)
        return self.keys[layer][:, :, span], self.values[layer][:, :, span]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stage a layer's new keys and values [B, H, L, D] after the cached ones (detached: the cache
        holds finished frames, never a graph); `advance` commits them."""
        if layer not in self.keys:  # the first write sets the buffers' batch, heads, dim and dtype
            shape = (*keys.shape[:2], 2 * (self.tokens + keys.shape[2]), keys.shape[3])
            self.keys[layer], self.values[layer] = keys.new_empty(shape), values.new_empty(shape)
            self.heads[layer] = 0
        room_keys, room_values = self.room(layer, len(keys), keys.shape[2])
        room_keys[:, :, self.tokens :] = keys.detach()
        room_values[:, :, self.tokens :] = values.detach()

    def _span(self, layer: int, tokens: int) -> slice:
        """The layer's cached tokens and `tokens` after them; a bigger buffer when there is no room."""
        head, cached, need = self.heads[layer], self.tokens, self.tokens + tokens
        if head + need > self.keys[layer].shape[2]:
            for store in self.keys, self.values:
                old = store[layer]
                store[layer] = old.new_empty(*old.shape[:2], max(2 * need, old.shape[2]), old.shape[3])
                store[layer][:, :, :cached] = old[:, :, head : head + cached]
            self.heads[layer] = head = 0
        return slice(head, head + need)

    def advance(self, frames: int, tokens_per_frame: int) -> None:
        """Commit `frames` staged frames and drop the oldest blocks after the sink beyond the window."""
        if frames % self.frames_per_block:
            raise ValueError(
                f"frames are written to the KV cache in whole blocks of {self.frames_per_block}; got {frames}"
            )
        self.frames += frames
        self.tokens += frames * tokens_per_frame
        self.end += frames
        drop = max(0, self.frames - self.max_frames)
        if drop:
            shift, sink = drop * tokens_per_frame, self.sink_frames * tokens_per_frame
            for layer, head in self.heads.items():
                if sink:  # the sink moves up to meet the rest of the window
                    for buffer in self.keys[layer], self.values[layer]:
                        moved = buffer[:, :, head : head + sink].clone()
                        buffer[:, :, head + shift : head + shift + sink] = moved
                self.heads[layer] = head + shift
            self.frames -= drop
            self.tokens -= shift

    def past(self, layer: int, batch: int, tokens: int, checkpointing: bool = False) -> Past:
        """What a layer's attention reads of the cache in a forward of `tokens` new tokens. Without grad,
        the buffer with room for them, which they are written into (no copy of the cache). With grad, the
        cached ones to concatenate to, so the graph holds its own copy, not the buffer that later writes
        change (copied here too under gradient `checkpointing`, whose backward reruns the layer)."""
        if not torch.is_grad_enabled():
            room = self.room(layer, batch, tokens)
            return Past(room, in_place=room is not None)
        cached = self.get(layer)
        if cached is not None and checkpointing:
            cached = (cached[0].clone(), cached[1].clone())
        return Past(cached)

    def cross(self, source: torch.Tensor, make: Callable[[], T]) -> T:
        """The cross-attention keys and values (whatever `make()` builds from `source` alone) for as long as
        the same tensor `source` comes back: a rollout's text, fixed while its frames grow, is projected
        once, not at every forward. For forwards without grad: what is kept holds no graph."""
        if source is not self.cross_source:
            self.cross_source, self.cross_values = source, make()
        return self.cross_values

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.heads.clear()
        self.frames = self.tokens = self.end = 0
        self.cross_source = self.cross_values = None
