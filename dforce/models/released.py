"""Causal Wan generators released by other codebases, read as dforce models.

Self-Forcing's `checkpoints/self_forcing_dmd.pt` and `ode_init.pt` (and CausVid's checkpoints, alike) are
`torch.save` dicts whose `generator` / `generator_ema` entries hold a Wan 2.1 transformer's weights under
Wan's original module names (`blocks.0.self_attn.q.weight`, ...) behind their wrapper's `model.` prefix
(and, where FSDP or activation checkpointing wrapped it, their wrappers' prefixes). They are read with
`torch.load(weights_only=True)`, which unpickles tensors and containers only, never code, renamed to
diffusers' names by diffusers' own Wan conversion, and loaded strictly into a `CausalWan` of the base
transformer's config: every weight accounted for, or an error naming the first that is not.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from torch import Tensor

from dforce.models.wan import CausalWan, transformer_class_name, transformer_folder

# The entries a released checkpoint holds, the one read by default first.
KEYS = ("generator_ema", "generator")
WRAPPERS = ("model.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def read_released(path: str | Path, key: str | None = None) -> tuple[dict[str, Tensor], str | None]:
    """The weights of entry `key` (default: the first of `KEYS` present; a checkpoint that is itself the
    weights has no entries) in diffusers' names, and the entry read. ValueError naming the file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"{path}: not a checkpoint torch.load reads as weights only ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a dict of weights")
    entries = [name for name, value in data.items() if isinstance(value, dict)]
    if key is None and entries:
        key = next((name for name in KEYS if name in entries), None)
        if key is None:
            raise ValueError(
                f"{path}: none of {', '.join(KEYS)} among its entries {sorted(entries)}; pass --key"
            )
    if key is not None:
        if key not in entries:
            raise ValueError(f"{path}: no entry {key!r}; its entries: {sorted(entries)}")
        data = data[key]
    state = {}
    for name, tensor in data.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(
                f"{path}: {key or 'the file'}'s {name!r} is a {type(tensor).__name__}, not a tensor"
            )
        while name.startswith(WRAPPERS):
            name = name.split(".", 1)[1]
        state[name] = tensor
    return convert_wan_transformer_to_diffusers(state), key


def load_released(
    path: str | Path, base: str | Path, key: str | None = None, **settings: Any
) -> tuple[CausalWan, str | None]:
    """A `CausalWan` of the transformer config in `base` (a pipeline root with transformer/, or the
    transformer folder; its weights are not read) holding the released weights of `path` (`read_released`),
    with `settings` (num_frames, frames_per_block, sample_size, ...); and the entry read."""
    folder = transformer_folder(Path(base)) or Path(base)
    name = transformer_class_name(folder)  # a folder of another model: ValueError naming it
    config = {
        k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")
    }
    state, key = read_released(path, key)
    model = CausalWan(transformer_class=name, transformer_config=config, **settings)
    try:
        missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a weight of another shape
        raise ValueError(f"{path}: its weights do not fit {folder}'s config: {error}") from None
    if missing or unexpected:
        problems = [f"missing {missing[:3]}"] if missing else []
        problems += [f"unexpected {unexpected[:3]}"] if unexpected else []
        raise ValueError(
            f"{path}: its weights are not a {name} of {folder}'s config: {'; '.join(problems)} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    return model.eval(), key
