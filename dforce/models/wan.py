"""Wan 2.1 and SkyReels-V2 (diffusers' `WanTransformer3DModel`, `SkyReelsV2Transformer3DModel`) as a
dforce backbone: per-frame timesteps, block-causal attention, the teacher layout and a rolling KV cache.

`CausalWan` holds the diffusers model unchanged and drives its own modules in its own order: the patch
embedding, the time and text embedder, the blocks, the output head. Two things differ from diffusers'
forward. Timesteps are per latent frame: each frame's embedding modulates that frame's tokens through the
per-token path Wan 2.2 and SkyReels-V2's diffusion forcing already take. Self-attention runs in our
processor (`BlockCausalProcessor`, set with diffusers' `set_attn_processor`), which takes the rotary
positions, the block-causal mask and the KV cache of `dforce.models.attention` from `SelfAttention`, handed to
it through the block's rotary argument. With one timestep and full visibility it is diffusers' forward.

`save_pretrained` writes the diffusers model as diffusers does plus `causal.json` (horizon, frames per
block, frame size), so an exported model loads in plain diffusers and in
`dforce.training.checkpoint.load_model`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from dforce.models.attention import Backend, KVCache, Layout, Past, attend, attention_mask
from dforce.models.causal import BlockCausal, place_frames, rotary_tables, teacher_layout

# The diffusers classes it wraps, by the `_class_name` their config.json carries.
TRANSFORMERS: dict[str, type[ModelMixin]] = {
    cls.__name__: cls for cls in (WanTransformer3DModel, SkyReelsV2Transformer3DModel)
}
SETTINGS_FILE = "causal.json"  # beside the diffusers config.json: what dforce adds to the model
SETTINGS = ("num_frames", "frames_per_block", "sample_size", "fps", "text")
ROPE_THETA = 10000.0  # Wan's rotary base (`WanRotaryPosEmbed`)


@dataclass
class SelfAttention:
    """What one block's self-attention takes beyond its input, and the keys and values it gives back.
    It rides in the block's `rotary_emb` argument, which diffusers' blocks pass to the processor as is."""

    rope: tuple[Tensor, Tensor]  # cos, sin [L, head_dim] at absolute frame positions
    mask: Tensor | BlockMask | None
    past: Past  # the KV cache's keys and values before this call's (`Past()`: none)
    new: tuple[Tensor, Tensor] | None = None  # set by the processor: this call's keys, values [B, H, L, d]


class BlockCausalProcessor:
    """Self-attention of a Wan or SkyReels-V2 block over `dforce.models.attention`'s layout: QK-norm, rotary
    at absolute positions, attention to the cache and the block-causal mask (SDPA or flex)."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,  # [B, L, D]
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        rotary_emb: SelfAttention | None = None,
    ) -> Tensor:
        if not isinstance(rotary_emb, SelfAttention):
            raise TypeError(
                "BlockCausalProcessor runs inside dforce.models.wan.CausalWan, which hands it SelfAttention"
            )
        state = rotary_emb

        def heads(x: Tensor) -> Tensor:
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)  # [B, H, L, d]

        q = heads(attn.norm_q(attn.to_q(hidden_states)))
        k = heads(attn.norm_k(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        q, k = apply_rotary_emb(q, state.rope), apply_rotary_emb(k, state.rope)
        state.new = k, v
        out = attend(q, *state.past.join(k, v), state.mask)  # [B, H, L, d]
        out = out.transpose(1, 2).flatten(2).type_as(q)  # [B, L, H * d]
        return attn.to_out[1](attn.to_out[0](out))


class CausalWan(BlockCausal, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """A diffusers Wan / SkyReels-V2 transformer made a dforce backbone (`dforce.models.backbone.Backbone`).

    forward(sample [B, T, C, H, W], timesteps [B, T], *, context, context_timesteps, cache, update_cache,
    frame_offset, encoder_hidden_states [B, L, text_dim], encoder_attention_mask [B, L]) -> [B, T, C, H, W]:
    the transformer's own output (Wan: the flow velocity, noise - clean, at timestep 1000 * sigma).
    Latent frames are its temporal tokens (temporal patch 1). No text: one zero token, as Wan's pipeline
    pads its prompts with zeros. `attention_backend` ("auto", "sdpa", "flex") is a runtime setting.
    Cost beyond diffusers' forward: the per-token modulation [B, T * N, 6, D], as its per-token paths take.
    """

    _supports_gradient_checkpointing = True
    # Accelerate's FSDP auto-wrap makes each block a unit; it keeps the names this model holds.
    _no_split_modules = ("WanTransformerBlock", "SkyReelsV2TransformerBlock")
    _repeated_blocks = ("WanTransformerBlock", "SkyReelsV2TransformerBlock")  # `compile_repeated_blocks`
    ignore_for_config = ("transformer",)

    @register_to_config
    def __init__(
        self,
        *,  # by keyword: diffusers' config drops what was passed by position as "default"
        transformer_class: str = "WanTransformer3DModel",
        transformer_config: dict[str, Any] | None = None,
        num_frames: int = 16,
        frames_per_block: int = 1,
        sample_size: tuple[int, int] = (60, 104),
        fps: int = 16,
        text: bool = True,
        transformer: ModelMixin | None = None,
    ) -> None:
        """A new (random) transformer of `transformer_config`, or the given one (`from_pretrained`)."""
        super().__init__()
        check_transformer(transformer_class, transformer_config or {})
        if transformer is None:
            transformer = TRANSFORMERS[transformer_class].from_config(transformer_config or {})
        patch = transformer.config.patch_size
        height, width = sample_size
        if height % patch[1] or width % patch[2]:
            raise ValueError(f"sample_size {height}x{width} is not divisible by the patch {tuple(patch[1:])}")
        if num_frames % frames_per_block:
            raise ValueError(
                f"num_frames {num_frames} is not a multiple of frames_per_block {frames_per_block}"
            )
        self.transformer = transformer
        self.grid = (height // patch[1], width // patch[2])
        self.attention_backend: Backend = "auto"
        self.gradient_checkpointing = False
        processors = transformer.attn_processors
        transformer.set_attn_processor(
            {name: BlockCausalProcessor() if ".attn1." in name else p for name, p in processors.items()}
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, subfolder: str | None = None, **settings: Any
    ) -> CausalWan:
        """A diffusers folder (`subfolder`, e.g. transformer) with the settings of its `causal.json`, which
        `settings` (num_frames, frames_per_block, sample_size, fps) override."""
        path = Path(directory) / (subfolder or "")
        name = transformer_class_name(path)
        saved = path / SETTINGS_FILE
        settings = (json.loads(saved.read_text()) if saved.is_file() else {}) | settings
        if missing := [key for key in ("num_frames", "sample_size") if key not in settings]:
            raise ValueError(f"{path}: no {SETTINGS_FILE}; give the settings {', '.join(missing)}")
        settings["sample_size"] = tuple(settings["sample_size"])
        transformer = TRANSFORMERS[name].from_pretrained(path)
        return cls(
            transformer_class=name,
            transformer_config=dict(transformer.config),
            transformer=transformer,
            **settings,
        )

    def save_pretrained(
        self, save_directory: str | Path, is_main_process: bool = True, **kwargs: Any
    ) -> None:
        """The diffusers model as diffusers writes it, and `causal.json` beside it."""
        self.transformer.save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            config = self.config
            settings = {key: config[key] for key in SETTINGS}
            (Path(save_directory) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, *self.config.sample_size)

    @property
    def null_label(self) -> int | None:
        return None

    @property
    def text_dim(self) -> int | None:
        """Wan's text width, or None for a model trained without text (every clip reads the zero token)."""
        return self.transformer.config.text_dim if self.config.text else None

    def _text(self, states: Tensor | None, mask: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        """Text embeddings [B, L, text_dim] with padded tokens zeroed; without text one zero token."""
        width = self.transformer.config.text_dim
        if states is None:
            if mask is not None:
                raise ValueError("encoder_attention_mask given without encoder_hidden_states")
            return torch.zeros(batch, 1, width, dtype=dtype, device=self.device)
        if not self.config.text:
            raise ValueError("encoder_hidden_states given to a model built with text: false")
        if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != width:
            raise ValueError(f"encoder_hidden_states {tuple(states.shape)} must be [B={batch}, L, {width}]")
        if mask is not None:
            if mask.shape != states.shape[:2]:
                raise ValueError(
                    f"encoder_attention_mask {tuple(mask.shape)} must be {tuple(states.shape[:2])}"
                )
            states = states * mask[..., None].to(states.dtype)
        return states.to(dtype)

    def _condition(self, timesteps: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-frame time embeddings temb [B, T, D] and modulations [B, T, 6, D], and the projected text."""
        net, frames = self.transformer, timesteps.shape[1]
        if isinstance(net, SkyReelsV2Transformer3DModel):
            temb, modulation, text, _ = net.condition_embedder(timesteps, text)  # [B, T, D], [B, T, 6D]
            modulation = modulation.unflatten(-1, (6, -1))
            if net.config.inject_sample_info:  # its fps embedding: 16 fps or other (24), as its pipeline
                fps = torch.tensor([0 if self.config.fps == 16 else 1], device=timesteps.device)
                modulation = modulation + net.fps_projection(net.fps_embedding(fps)).unflatten(-1, (6, -1))
        else:  # Wan 2.2's per-token path, one timestep per frame
            temb, modulation, text, _ = net.condition_embedder(
                timesteps.flatten(), text, timestep_seq_len=frames
            )
            modulation = modulation.unflatten(-1, (6, -1))
        return temb, modulation, text

    def _run_block(
        self, block: nn.Module, x: Tensor, text: Tensor, modulation: Tensor, attention: SelfAttention
    ) -> Tensor:
        """One block with per-token modulation [B, L, 6, D] (SkyReels-V2 takes it as [B, 6, L, D])."""
        if isinstance(self.transformer, SkyReelsV2Transformer3DModel):
            args = (x, text, modulation.transpose(1, 2), attention, None)
        else:
            args = (x, text, modulation, attention)
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        sample: Tensor,
        timesteps: Tensor,
        *,
        labels: Tensor | None = None,
        actions: Tensor | None = None,
        context: Tensor | None = None,
        context_timesteps: Tensor | None = None,
        cache: KVCache | None = None,
        update_cache: bool = False,
        frame_offset: int = 0,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """sample [B, T, C, H, W], timesteps [B, T] -> [B, T, C_out, H, W]; the rest as
        `CausalVideoTransformer.forward`, and text (`encoder_hidden_states` [B, L, text_dim] with
        `encoder_attention_mask` [B, L], True for real tokens)."""
        net, config = self.transformer, self.config
        batch, frames = sample.shape[:2]
        cached, frame_offset = place_frames(self, sample, timesteps, cache, update_cache, frame_offset)
        if labels is not None or actions is not None:
            raise ValueError("the wan backbone takes no labels or actions")
        teacher = context is not None
        sample, timesteps = teacher_layout(sample, timesteps, context, context_timesteps, cache)

        dtype = net.patch_embedding.weight.dtype
        x = net.patch_embedding(rearrange(sample, "b t c h w -> b c t h w").to(dtype))  # [B, D, T', h, w]
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, T' * N, D]
        tokens = self.grid[0] * self.grid[1]
        text = self._text(encoder_hidden_states, encoder_attention_mask, batch, dtype)
        temb, modulation, text = self._condition(timesteps, text)  # [B, T', D], [B, T', 6, D]
        modulation = modulation.repeat_interleave(tokens, dim=1)  # [B, T' * N, 6, D]: each frame's tokens
        head_dim = net.config.attention_head_dim
        rope = rotary_tables(frames, *self.grid, frame_offset, head_dim, ROPE_THETA, x.device, 1 + teacher)
        layout = Layout(frames, tokens, config.frames_per_block, cached=cached, teacher=teacher)
        mask = attention_mask(layout, x.device, self.attention_backend, torch.is_grad_enabled())

        for layer, block in enumerate(net.blocks):
            checkpointing = self.gradient_checkpointing
            past = Past() if cache is None else cache.past(layer, batch, x.shape[1], checkpointing)
            attention = SelfAttention(rope, mask, past)
            x = self._run_block(block, x, text, modulation, attention)
            if update_cache and not past.in_place:
                cache.append(layer, *attention.new)
        if update_cache:
            cache.advance(frames, tokens)

        # The output head per frame; the teacher layout predicts its noisy half only.
        x = rearrange(x, "b (t n) d -> b t n d", n=tokens)[:, -frames:]
        shift, scale = (net.scale_shift_table[:, :, None] + temb[:, None, -frames:]).unbind(1)  # [B, T, D]
        x = (net.norm_out(x.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x)
        x = net.proj_out(x)  # [B, T, N, p * q * C]
        _, p, q = net.config.patch_size
        return rearrange(x, "b t (h w) (p q c) -> b t c (h p) (w q)", h=self.grid[0], p=p, q=q)


def transformer_class_name(path: Path) -> str:
    """The `_class_name` of a diffusers model folder; ValueError naming it and the supported ones."""
    file = path / "config.json"
    if not file.is_file():
        raise ValueError(f"{path}: no config.json; pass a diffusers model folder (and its subfolder)")
    name = json.loads(file.read_text()).get("_class_name")
    if name not in TRANSFORMERS:
        raise ValueError(f"{path} holds a {name}; the wan backbone takes one of {', '.join(TRANSFORMERS)}")
    return name


def transformer_folder(path: Path) -> Path | None:
    """The diffusers Wan / SkyReels-V2 transformer folder at `path` or in its `transformer/` (a pipeline
    root), None if neither holds one."""
    for folder in (path, path / "transformer"):
        file = folder / "config.json"
        if file.is_file() and json.loads(file.read_text()).get("_class_name") in TRANSFORMERS:
            return folder
    return None


def check_transformer(name: str, config: dict[str, Any]) -> None:
    """ValueError("key: problem") unless `config` is an init config of transformer class `name` that dforce
    can drive: text-to-video (no image embedding), temporal patch 1."""
    if name not in TRANSFORMERS:
        raise ValueError(f"class_name: {name!r} is not one of {', '.join(TRANSFORMERS)}")
    valid = [key for key in inspect.signature(TRANSFORMERS[name].__init__).parameters if key != "self"]
    for key in config:
        if key not in valid and not key.startswith("_"):
            raise ValueError(f"config.{key}: unknown key of {name}; valid keys: {', '.join(valid)}")
    patch = config.get("patch_size", (1, 2, 2))
    if len(patch) != 3 or patch[0] != 1:
        raise ValueError(
            f"config.patch_size: {list(patch)}: dforce maps latent frames 1:1 to temporal tokens, so the "
            "temporal patch must be 1"
        )
    if config.get("image_dim") is not None or config.get("added_kv_proj_dim") is not None:
        raise ValueError(
            "config: image-to-video transformers (image_dim, added_kv_proj_dim) are not supported"
        )


def check_wan(
    sample_size: tuple[int, int] | None = None,
    pretrained: str | None = None,
    subfolder: str | None = None,
    class_name: str | None = None,
    config: dict[str, Any] | None = None,
    **settings: Any,
) -> None:
    """What a config can check of `build_wan`'s arguments without loading weights; ValueError("key: ...")."""
    if sample_size is None:
        raise ValueError("sample_size: required for the wan backbone: [height, width] of a latent frame")
    if pretrained is not None:
        if config is not None or class_name is not None:
            raise ValueError(
                "pretrained: give pretrained (a diffusers folder) or class_name and config, not both"
            )
        path = Path(pretrained) / (subfolder or "")
        try:
            name = transformer_class_name(path)
        except ValueError as error:
            raise ValueError(f"pretrained: {error}") from None
        check_transformer(name, json.loads((path / "config.json").read_text()))
    elif config is None:  # diffusers' defaults are the 14B shape: never built at random by omission
        raise ValueError(
            "pretrained: give the diffusers folder to start from (model.pretrained=DIR), or class_name and "
            "config (the class's own arguments) for a new random model"
        )
    else:
        name = class_name or "WanTransformer3DModel"
        check_transformer(name, config)
        try:  # the values, on the meta device: no memory, no time
            with torch.device("meta"):
                TRANSFORMERS[name].from_config(config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config: {name} cannot be built from it: {error}") from None


def build_wan(
    sample_size: tuple[int, int] | None = None,
    num_frames: int = 16,
    frames_per_block: int = 1,
    pretrained: str | None = None,
    subfolder: str | None = None,
    class_name: str | None = None,
    config: dict[str, Any] | None = None,
    fps: int = 16,
    text: bool = True,
) -> CausalWan:
    """`model: {backbone: wan, ...}`: the pretrained diffusers transformer in `pretrained`/`subfolder`, or a
    new one of `class_name` (WanTransformer3DModel or SkyReelsV2Transformer3DModel) built from `config`,
    its own init arguments; `sample_size` [height, width] of a latent frame, `num_frames` the horizon,
    `fps` what SkyReels-V2's fps embedding is told (16 or 24), `text` whether it reads the clips' text."""
    check_wan(sample_size, pretrained, subfolder, class_name, config)
    settings = dict(
        num_frames=num_frames,
        frames_per_block=frames_per_block,
        sample_size=tuple(sample_size),
        fps=fps,
        text=text,
    )
    if pretrained is not None:
        return CausalWan.from_pretrained(pretrained, subfolder, **settings)
    return CausalWan(
        transformer_class=class_name or "WanTransformer3DModel", transformer_config=config, **settings
    )
