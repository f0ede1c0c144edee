"""LoRA adapters (`train.lora`) through peft and diffusers' `PeftAdapterMixin`: added to a backbone for
training with its base frozen, written beside the base weights in the file diffusers' `load_lora_weights`
reads, read back when a model directory is loaded, and merged into the base for a plain model.

A model directory of an adapted model holds the base weights (`save_pretrained` of the model without its
adapters) and `pytorch_lora_weights.safetensors`: the adapters under `transformer.`-prefixed keys with
their `LoraConfig` in the metadata, as `WanLoraLoaderMixin.save_lora_weights` writes them. The adapters
live in the backbone's diffusers model (`lora_module`: a wrapper's inner transformer, such as
`dforce.models.wan.CausalWan`'s), so the file's keys are that model's names and a diffusers pipeline loads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from accelerate import init_empty_weights
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from peft.tuners.tuners_utils import cast_adapter_dtype, check_target_module_exists
from peft.utils import get_peft_model_state_dict
from torch import nn

LORA_FILE = LORA_WEIGHT_NAME_SAFE  # pytorch_lora_weights.safetensors
ADAPTER = "default"  # the one adapter a trained model carries
PREFIX = "transformer"  # the component name diffusers' LoRA loaders expect before every key

# A backbone's attention and MLP linears, matched as peft matches them: a module named so, or whose
# name ends in "." + the target. The first module of a class here (or a subclass) holds the adapters.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "CausalVideoTransformer": ("qkv", "proj", "mlp.net.0.proj", "mlp.net.2"),
    "WanTransformer3DModel": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
    "SkyReelsV2Transformer3DModel": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}


@dataclass
class LoraConfig:
    """`train.lora`: train low-rank adapters over a frozen base instead of every weight."""

    rank: int
    alpha: float | None = None  # the adapter's output is scaled by alpha / rank; None: rank (scale 1)
    target_modules: list[str] | None = None  # module names (or name endings); None: the backbone's defaults
    dropout: float = 0.0  # on the adapter's input, in training

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must lie in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: name at least one module, or leave it out for the defaults")


def add_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """Freeze `model` and add one trainable adapter (starting at zero: the model's function is unchanged)
    to its target modules; a target that matches no module is an error naming the modules there are."""
    _, root = lora_module(model)
    targets = list(cfg.target_modules or default_targets(root))
    names = [name for name, _ in root.named_modules()]
    for target in targets:
        if not any(check_target_module_exists(peft.LoraConfig(target_modules=[target]), n) for n in names):
            raise ValueError(
                f"train.lora.target_modules: {target!r} matches no module of {type(root).__name__}; "
                f"its linear modules: {linear_names(root)}"
            )
    model.requires_grad_(False)  # a wrapper's own weights too
    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha or cfg.rank,
        target_modules=targets,
        lora_dropout=cfg.dropout,
    )
    root.add_adapter(config, adapter_name=ADAPTER)
    cast_adapter_dtype(root, ADAPTER)  # fp32 adapters over a bf16 base, as peft's own models make them


def lora_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The module that holds the adapters, and its name in `model`: the first of a class in
    `DEFAULT_TARGETS` (or a subclass), else `model` itself."""
    for name, module in model.named_modules():
        if any(cls.__name__ in DEFAULT_TARGETS for cls in type(module).__mro__):
            return name, module
    return "", model


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The targets of the model's class in `DEFAULT_TARGETS`, or an error asking for them."""
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_TARGETS:
            return DEFAULT_TARGETS[cls.__name__]
    raise ValueError(
        f"train.lora.target_modules: no default targets for {type(model).__name__}; name the modules to "
        f"adapt among its linear modules: {linear_names(model)}"
    )


def linear_names(model: nn.Module) -> str:
    """The names of the model's linear modules, the first index of a repeated block as `*`."""
    names = [re.sub(r"\.\d+\.", ".*.", n, count=1) for n, m in model.named_modules() if type(m) is nn.Linear]
    return ", ".join(dict.fromkeys(names))


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(lora_module(model)[1], "peft_config", None))


def save_lora_model(model: nn.Module, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The base weights as a plain model directory (`save_pretrained`) and the adapters beside them in
    diffusers' LoRA file. `state`: the model's whole state dict when it is not in `model` (FSDP's gathered
    one); the base is written from it without a copy of the weights."""
    state = model.state_dict() if state is None else state
    name, root = lora_module(model)
    prefix = f"{name}." if name else ""
    own = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    adapters = get_peft_model_state_dict(root, state_dict=own, adapter_name=ADAPTER)
    # peft keeps a wrapped layer's own weights under `.base_layer`; diffusers drops it the same way
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    with init_empty_weights():
        plain = type(model).from_config(model.config)
    plain.load_state_dict(base, assign=True)
    plain.save_pretrained(directory)
    WanLoraLoaderMixin.save_lora_weights(
        directory,
        transformer_lora_layers=adapters,
        transformer_lora_adapter_metadata=root.peft_config[ADAPTER].to_dict(),
    )


def load_lora(model: nn.Module, directory: str | Path) -> None:
    """The adapters of a model directory, if it has them, added to its base through diffusers' reader."""
    if (Path(directory) / LORA_FILE).is_file():
        root = lora_module(model)[1]
        root.load_lora_adapter(str(directory), weight_name=LORA_FILE, prefix=PREFIX, adapter_name=ADAPTER)


def merge_lora(model: nn.Module) -> nn.Module:
    """The active adapters added into the base weights and removed: a plain model that needs no peft."""
    if has_lora(model):
        root = lora_module(model)[1]
        root.fuse_lora()
        root.unload_lora()
    return model


def share_base(model: nn.Module, **config: Any) -> nn.Module:
    """A second module tree over the very same (frozen) weight tensors: one copy of the weights in memory
    for several models that each carry their own adapter (self-forcing's generator and critic over the
    teacher). Each tree is prepared, wrapped and checkpointed on its own, as a copy would be. `config`
    overrides entries of the model's config that leave its weights' shapes alone (`frames_per_block`: a
    causal generator over a bidirectional teacher's weights)."""
    with init_empty_weights():
        twin = type(model).from_config({**model.config, **config})
    twin.load_state_dict(model.state_dict(keep_vars=True), assign=True)  # the same Parameter objects
    return twin.requires_grad_(False)
