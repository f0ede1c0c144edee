"""The causal spatio-temporal transformer: noisy frames and their per-frame levels -> a prediction.

It knows nothing of the noise process: `timesteps` are whatever numbers the loss passes (0..1000, see
`dforce.diffusion.noise.NoiseSchedule.timesteps`), and what the output means (eps, x0, v, flow) is decided by
the loss. Each frame's timestep (plus an optional clip label and per-frame action) modulates that frame's
tokens through adaLN-Zero, which is what lets every frame sit at its own noise level. Attention is
block-causal over frames with 3-D rotary positions (time, height, width), so it depends on relative time
and a rolling KV cache (`dforce.models.attention.KVCache`) is exact past the training horizon.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import (
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    Timesteps,
    apply_rotary_emb,
)
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from dforce.models.attention import Backend, KVCache, Layout, Past, attend, attention_mask
from dforce.models.causal import BlockCausal, place_frames, rotary_split, rotary_tables, teacher_layout


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, T, N, D]; shift, scale [B, T, D]: one modulation per frame, shared by its tokens."""
    return x * (1 + scale[:, :, None]) + shift[:, :, None]


class CrossAttention(nn.Module):
    """Every token attends to its clip's text tokens (QK-norm, no positions). The output projection starts
    at zero, so a model starts as the one without text; a clip with no tokens (the null text) gets nothing,
    exactly as a forward without text."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, heads * head_dim)
        self.kv = nn.Linear(dim, 2 * heads * head_dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(heads * head_dim, dim)

    def keys_values(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text [B, L, D], projected to the model's width -> its keys and values [B, H, L, d]."""
        k, v = rearrange(self.kv(text), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        return self.k_norm(k.float()).to(v.dtype), v

    def forward(
        self,
        x: torch.Tensor,  # [B, T, N, D]
        text: torch.Tensor | tuple[torch.Tensor, torch.Tensor],  # projected [B, L, D], or `keys_values`
        mask: torch.Tensor,  # [B, L] bool, True = a real token
    ) -> torch.Tensor:
        """-> what the text adds to x, [B, T, N, D]."""
        frames = x.shape[1]
        q = rearrange(self.q(self.norm(x)), "b t n (h d) -> b h (t n) d", h=self.heads)
        k, v = self.keys_values(text) if isinstance(text, torch.Tensor) else text
        q = self.q_norm(q.float()).to(v.dtype)
        present = mask.any(dim=1)  # [B]
        # A clip without tokens would attend to nothing (NaN): it attends to all, then gets zero.
        visible = (mask | ~present[:, None])[:, None, None]  # [B, 1, 1, L]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # [B, H, T * N, d]
        h = self.proj(rearrange(h, "b h (t n) d -> b t n (h d)", t=frames))
        return torch.where(present[:, None, None, None], h, 0)


class TransformerBlock(nn.Module):
    """Pre-norm attention + MLP, both modulated and gated per frame (adaLN-Zero), QK-norm, rotary; with
    `text`, cross-attention to the text between them."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, text: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.modulation = nn.Linear(dim, 6 * dim)
        self.cross = CrossAttention(dim, heads, head_dim) if text else None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, N, D]
        cond: torch.Tensor,  # [B, T, D], already through SiLU
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [T * N, head_dim]
        mask: torch.Tensor | BlockMask | None,
        past: Past,  # the KV cache's keys and values before this call's (`Past()`: none)
        text: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,  # see `CrossAttention`
        text_mask: torch.Tensor | None = None,  # [B, L] bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """-> the new x, and this call's keys and values for the cache; no state is kept."""
        frames, tokens = x.shape[1], x.shape[2]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)  # [B, T, D]

        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = rearrange(self.qkv(h), "b t n (three h d) -> three b h (t n) d", three=3, h=self.heads)
        q = apply_rotary_emb(self.q_norm(q.float()), rope).to(v.dtype)  # norms in fp32 under autocast
        k = apply_rotary_emb(self.k_norm(k.float()), rope).to(v.dtype)
        h = attend(q, *past.join(k, v), mask)  # [B, H, T * N, d]
        h = rearrange(h, "b h (t n) d -> b t n (h d)", t=frames, n=tokens)
        x = x + gate1[:, :, None] * self.proj(h)
        if text is not None:
            x = x + self.cross(x, text, text_mask)

        h = _modulate(self.norm2(x), shift2, scale2)
        return x + gate2[:, :, None] * self.mlp(h), (k, v)


class CausalVideoTransformer(BlockCausal, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Denoiser for clips whose frames carry independent noise levels.

    forward(sample [B, T, C, H, W], timesteps [B, T]) -> [B, T, C_out, H, W], T up to `num_frames`.
    Optional: `labels` [B] (the value `num_classes` means "no label", for classifier-free guidance),
    `actions` [B, T, action_dim], `context` (the teacher-forcing layout, see `dforce.models.attention`), and
    `cache` / `update_cache` for rollout, and with `text_dim` the text: `encoder_hidden_states` [B, L,
    text_dim] and `encoder_attention_mask` [B, L] (True = a token; no text or no tokens: the unconditional
    model, see `CrossAttention`). `attention_backend` ("auto", "sdpa", "flex") is a runtime
    setting, not part of the saved config. It meets `dforce.models.backbone.Backbone`, the interface callers
    use.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ("TransformerBlock",)  # Accelerate's FSDP auto-wrap makes each block a unit
    _repeated_blocks = ("TransformerBlock",)  # regional compilation: `model.compile_repeated_blocks()`

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        sample_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        num_frames: int = 16,
        num_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        frames_per_block: int = 1,
        num_classes: int | None = None,
        action_dim: int | None = None,
        mlp_ratio: float = 4.0,
        rope_theta: float = 10000.0,
        timestep_channels: int = 256,
        text_dim: int | None = None,
    ) -> None:
        super().__init__()
        height, width = _pair(sample_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"sample_size {height}x{width} is not divisible by patch_size {patch_size}")
        if num_frames % frames_per_block:
            raise ValueError(
                f"num_frames {num_frames} is not a multiple of frames_per_block {frames_per_block}"
            )
        rotary_split(attention_head_dim)
        dim = num_attention_heads * attention_head_dim
        self.out_channels = out_channels or in_channels
        self.grid = (height // patch_size, width // patch_size)
        self.attention_backend: Backend = "auto"
        self.gradient_checkpointing = False

        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)
        self.time_proj = Timesteps(timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(timestep_channels, dim)
        self.label_embed = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.action_embed = nn.Linear(action_dim, dim) if action_dim else None
        self.text_embed = PixArtAlphaTextProjection(text_dim, dim, act_fn="gelu_tanh") if text_dim else None
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio, bool(text_dim))
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, self.out_channels * patch_size**2)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT initialisation: Xavier linears; modulations, cross-attention outputs and the output projection
        start at zero, so every block starts as the identity and the model as the zero function."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in self.time_embed.linear_1, self.time_embed.linear_2:
            nn.init.normal_(linear.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            if block.cross is not None:
                nn.init.zeros_(block.cross.proj.weight)
        for linear in self.modulation_out, self.proj_out:
            nn.init.zeros_(linear.weight)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, *(g * self.config.patch_size for g in self.grid))

    @property
    def null_label(self) -> int | None:
        return self.config.num_classes or None

    @property
    def text_dim(self) -> int | None:
        return self.config.text_dim

    def _condition(
        self, timesteps: torch.Tensor, labels: torch.Tensor | None, actions: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-frame conditioning [B, T, D] from timesteps [B, T], labels [B], actions [B, T, A]."""
        batch, frames = timesteps.shape
        t_emb = self.time_proj(timesteps.flatten()).to(self.patch_embed.weight.dtype)
        cond = self.time_embed(t_emb).view(batch, frames, -1)
        if labels is not None and self.label_embed is None:
            raise ValueError("labels given to a model built without num_classes")
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((batch,), self.config.num_classes, device=timesteps.device)
            cond = cond + self.label_embed(labels)[:, None]
        if actions is not None:
            if self.action_embed is None:
                raise ValueError("actions given to a model built without action_dim")
            if actions.shape[:2] != (batch, frames):
                raise ValueError(f"actions {tuple(actions.shape)} do not match timesteps {(batch, frames)}")
            cond = cond + self.action_embed(actions.to(cond.dtype))
        return F.silu(cond)

    def _text(
        self, states: torch.Tensor | None, mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Text states [B, L, text_dim] and their mask [B, L] (default: every token), checked; (None, None)
        without text."""
        if states is None:
            if mask is not None:
                raise ValueError("encoder_attention_mask given without encoder_hidden_states")
            return None, None
        if self.text_embed is None:
            raise ValueError("encoder_hidden_states given to a model built without text_dim")
        if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != self.config.text_dim:
            raise ValueError(
                f"encoder_hidden_states {tuple(states.shape)} must be [B, L, text_dim] = "
                f"[{batch}, L, {self.config.text_dim}]"
            )
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        elif mask.shape != states.shape[:2]:
            raise ValueError(
                f"encoder_attention_mask {tuple(mask.shape)} must be [B, L] = {tuple(states.shape[:2])}"
            )
        return states, mask.bool()

    def _cross(
        self, states: torch.Tensor | None, cache: KVCache | None
    ) -> list[torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None]:
        """What each block's cross-attention reads of the text states [B, L, text_dim]: the text projected to
        the model's width [B, L, D]; in a forward on a cache without grad (a rollout's, whose text stays
        while its frames grow), each block's keys and values of it, made once per cache (`KVCache.cross`)."""
        if states is None:
            return [None] * len(self.blocks)

        def projected() -> torch.Tensor:  # [B, L, D]
            return self.text_embed(states.to(self.patch_embed.weight.dtype))

        def keys_values() -> list[tuple[torch.Tensor, torch.Tensor]]:
            text = projected()
            return [block.cross.keys_values(text) for block in self.blocks]

        if cache is None or torch.is_grad_enabled():
            return [projected()] * len(self.blocks)
        return cache.cross(states, keys_values)  # keyed by the caller's own tensor, not a cast copy

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_timesteps: torch.Tensor | None = None,
        cache: KVCache | None = None,
        update_cache: bool = False,
        frame_offset: int = 0,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample [B, T, C, H, W], timesteps [B, T] -> [B, T, C_out, H, W].

        context [B, T, C, H, W]: the teacher-forcing layout; frame t of `sample` sees context frames of
        earlier blocks (at `context_timesteps`, default 0) and its own block of `sample`.
        cache: attend to its frames too and place `sample` right after them; with `update_cache`,
        append these frames' keys and values (whole blocks). frame_offset: position of the first frame
        when there is no cache, so a recomputed window matches a rolling cache. encoder_hidden_states
        [B, L, text_dim], encoder_attention_mask [B, L] bool: the text every frame's tokens attend to.
        """
        config = self.config
        batch, frames = sample.shape[:2]
        cached, frame_offset = place_frames(self, sample, timesteps, cache, update_cache, frame_offset)
        if actions is not None and context is not None:
            actions = torch.cat([actions, actions], dim=1)
        sample, timesteps = teacher_layout(sample, timesteps, context, context_timesteps, cache)

        p = config.patch_size
        x = rearrange(sample, "b t c (h p) (w q) -> b t (h w) (c p q)", p=p, q=p)
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype))  # [B, T', N, D]
        cond = self._condition(timesteps, labels, actions)  # [B, T', D]
        states, text_mask = self._text(encoder_hidden_states, encoder_attention_mask, batch)  # [B, L, D']
        texts = self._cross(states, cache)
        teacher = context is not None
        cos, sin = rotary_tables(
            frames,
            *self.grid,
            frame_offset,
            config.attention_head_dim,
            config.rope_theta,
            x.device,
            1 + teacher,
        )
        layout = Layout(frames, x.shape[2], config.frames_per_block, cached=cached, teacher=teacher)
        mask = attention_mask(layout, x.device, self.attention_backend, torch.is_grad_enabled())

        for layer, (block, text) in enumerate(zip(self.blocks, texts, strict=True)):
            tokens = x.shape[1] * x.shape[2]
            past = Past() if cache is None else cache.past(layer, batch, tokens, self.gradient_checkpointing)
            args = (x, cond, (cos, sin), mask, past, text, text_mask)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x, (k, v) = self._gradient_checkpointing_func(block, *args)
            else:
                x, (k, v) = block(*args)
            if update_cache and not past.in_place:
                cache.append(layer, k, v)
        if update_cache:
            cache.advance(frames, x.shape[2])

        x, cond = x[:, -frames:], cond[:, -frames:]  # the teacher layout predicts its noisy half only
        shift, scale = self.modulation_out(cond).chunk(2, dim=-1)
        x = self.proj_out(_modulate(self.norm_out(x), shift, scale))  # [B, T, N, C_out * p * p]
        return rearrange(x, "b t (h w) (c p q) -> b t c (h p) (w q)", h=self.grid[0], p=p, q=p)
