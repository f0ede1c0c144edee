"""The one model interface: what the loss, the samplers, self-forcing, evaluation and the likelihoods ask of
a network, and the table of the classes that provide it.

A backbone knows nothing of the noise process. Callers type against `Backbone`, never against a class,
so a second network (a pretrained video transformer made block-causal) plugs in by meeting the protocol
and joining `BACKBONES`; no caller changes. Wrapped models (DDP, FSDP, compiled) are called as given,
and their attributes are read from `accelerate.utils.extract_model_from_parallel(model)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dforce.models.attention import KVCache
from dforce.models.model import CausalVideoTransformer
from dforce.models.wan import TRANSFORMERS, CausalWan, build_wan, check_wan


@runtime_checkable
class Backbone(Protocol):
    """A denoiser for clips whose frames carry their own noise levels, block-causal over frames.

    forward(sample [B, T, C, H, W], timesteps [B, T], *, labels [B] | None, actions [B, T, A] | None,
            context [B, T, C, H, W] | None, context_timesteps [B, T] | None,
            cache: KVCache | None, update_cache: bool, frame_offset: int,
            encoder_hidden_states [B, L, D] | None, encoder_attention_mask [B, L] | None) -> [B, T, C, H, W]

    T <= `horizon` (cached frames included). Frame t sees the frames of its own and earlier blocks of
    `frames_per_block` frames. `context`: the teacher-forcing layout, every frame of `sample` seeing the
    clean (or lightly noised) `context` frames of earlier blocks instead of their noisy selves, so one
    forward trains every next-block problem of a clip. `cache` (from `new_cache`): attend to the cached
    frames too and place `sample` right after them; with `update_cache`, append these frames' keys and
    values (whole blocks). `frame_offset`: the position of the first frame without a cache, so that a
    recomputed window equals the rolling cache. Labels equal to `null_label` mean "no label".
    `encoder_hidden_states`: the clip's text, D = `text_dim`, zero after its tokens; `encoder_attention_mask`
    bool, True for a token (default: all). Every frame reads the whole text. No text, or a mask all False
    (the null text, `dforce.data.text.Text.null`), is the unconditional model of text guidance.
    """

    attention_backend: str  # "auto" | "flex" | "sdpa": a runtime setting, not saved

    @property
    def horizon(self) -> int:
        """The most frames one forward sees (the training clip length)."""

    @property
    def frames_per_block(self) -> int:
        """Frames denoised together; attention is causal between blocks."""

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one frame of `sample`."""

    @property
    def null_label(self) -> int | None:
        """The label id meaning "no label" (classifier-free guidance), None for an unlabelled model."""

    @property
    def text_dim(self) -> int | None:
        """D of the `encoder_hidden_states` the model reads, None for a model without text."""

    @property
    def device(self) -> torch.device: ...

    def __call__(self, sample: Tensor, timesteps: Tensor, **kwargs: Any) -> Tensor: ...

    def new_cache(self, max_frames: int | None = None, sink_frames: int = 0) -> KVCache:
        """An empty rolling KV cache of `max_frames` frames (default: the horizon minus one block), whose
        first `sink_frames` frames stay in it for good."""

    def enable_gradient_checkpointing(self) -> None: ...

    def compile_repeated_blocks(self, **kwargs: Any) -> None: ...

    def save_pretrained(self, directory: str | Path) -> None: ...


def is_bidirectional(model: Backbone) -> bool:
    """Whether the model's one block is its horizon: it sees a whole clip with full attention (self-forcing
    scores a clip with such a teacher at one level, reading no generated history)."""
    return model.frames_per_block == model.horizon


# Classes by the `_class_name` that `save_pretrained` writes in config.json (`CausalWan` writes Wan's own).
BACKBONES: dict[str, type] = {"CausalVideoTransformer": CausalVideoTransformer} | dict.fromkeys(
    TRANSFORMERS, CausalWan
)


@dataclass(frozen=True)
class Builder:
    """How the config's `model.backbone` makes a new model: `build`'s parameters are the section's keys
    (`dforce.training.config` checks them against its signature); `check` (the same keywords) tells at config
    time what it can without building, raising ValueError("key: problem")."""

    build: Callable[..., Backbone]
    check: Callable[..., None] | None = None


BUILDERS: dict[str, Builder] = {
    "dforce": Builder(CausalVideoTransformer),
    "wan": Builder(build_wan, check_wan),
}


def build_model(arguments: dict[str, Any]) -> Backbone:
    """A new model from the config's `model` section (with its implied defaults, `config.model_kwargs`);
    `backbone` picks the builder, `dforce` by default."""
    arguments = dict(arguments)
    return BUILDERS[arguments.pop("backbone", "dforce")].build(**arguments)
