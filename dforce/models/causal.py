"""What every block-causal backbone shares, ours (`dforce.models.model`) and the wrapped pretrained ones
(`dforce.models.wan`): 3-D rotary positions at absolute frame indices, the checks that place a forward's
frames after the cache, the teacher-forcing layout, and the horizon, blocks and KV cache a config gives."""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn

from dforce.models.attention import KVCache


def rotary_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to (time, height, width); each even, time gets the remainder."""
    space = 2 * (head_dim // 6)
    if head_dim % 2 or space < 2:
        raise ValueError(f"attention_head_dim must be even and at least 6 for 3-D rotary; got {head_dim}")
    return head_dim - 2 * space, space, space


@functools.lru_cache(maxsize=256)
def rotary_tables(
    frames: int,
    height: int,
    width: int,
    offset: int,
    head_dim: int,
    theta: float,
    device: torch.device,
    copies: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [copies * frames * height * width, head_dim] for frames at positions offset.. (built in
    float64, so positions far past the horizon stay exact to float32 rounding). The teacher layout
    takes two copies: its context and noisy halves sit at the same positions."""
    dims = rotary_split(head_dim)
    grid = torch.meshgrid(
        torch.arange(offset, offset + frames, dtype=torch.float64, device=device),
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    tables = [
        get_1d_rotary_pos_embed(dim, axis.flatten(), theta, use_real=True, freqs_dtype=torch.float64)
        for dim, axis in zip(dims, grid, strict=True)
    ]
    cos = torch.cat([c for c, _ in tables], dim=-1).repeat(copies, 1)  # [copies * T * h * w, head_dim]
    sin = torch.cat([s for _, s in tables], dim=-1).repeat(copies, 1)
    return cos, sin


def place_frames(
    model: nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    cache: KVCache | None,
    update_cache: bool,
    frame_offset: int,
) -> tuple[int, int]:
    """A backbone's forward inputs checked against the model (its `frame_shape` and `horizon`) and the
    cache: -> (frames cached, the position of the first new frame). ValueError naming what does not fit."""
    batch, frames, *shape = sample.shape
    if tuple(shape) != model.frame_shape:
        raise ValueError(
            f"sample {tuple(sample.shape)} does not match the model: (C, H, W) must be {model.frame_shape}"
        )
    if timesteps.shape != (batch, frames):
        raise ValueError(f"timesteps {tuple(timesteps.shape)} must be [B, T] = {(batch, frames)}")
    cached = 0 if cache is None else cache.frames
    if cached + frames > model.horizon:
        raise ValueError(
            f"{cached} cached + {frames} new frames exceed the training horizon num_frames={model.horizon}"
        )
    if cache is not None:
        if frame_offset:
            raise ValueError("frame_offset is taken from the cache; pass one or the other")
        return cached, cache.end
    if update_cache:
        raise ValueError("update_cache=True needs a cache")
    return cached, frame_offset


def teacher_layout(
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor | None,
    context_timesteps: torch.Tensor | None,
    cache: KVCache | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """With `context` the teacher-forcing layout, context frames then the sample's: [B, 2T, C, H, W] and
    [B, 2T] (context timesteps default 0); without, sample and timesteps as given."""
    if context is None:
        return sample, timesteps
    if context.shape != sample.shape or cache is not None:
        raise ValueError("context must have the shape of sample and cannot be combined with a cache")
    if context_timesteps is None:
        context_timesteps = torch.zeros_like(timesteps)
    return torch.cat([context, sample], dim=1), torch.cat([context_timesteps, timesteps], dim=1)


class BlockCausal:
    """What every backbone's config gives alike (`num_frames`, `frames_per_block`): its horizon, its blocks
    and its KV cache (`dforce.models.backbone.Backbone`)."""

    config: Any

    @property
    def horizon(self) -> int:
        return self.config.num_frames

    @property
    def frames_per_block(self) -> int:
        return self.config.frames_per_block

    def new_cache(self, max_frames: int | None = None, sink_frames: int = 0) -> KVCache:
        """A KV cache whose window, with one block being denoised, stays within the training horizon;
        `sink_frames` first frames are kept for good (see `KVCache`)."""
        block = self.config.frames_per_block
        window = self.config.num_frames - block if max_frames is None else max_frames
        return KVCache(window, block, sink_frames)
