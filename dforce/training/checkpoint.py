"""A run directory's checkpoints and its exported model: written atomically, resumed from the newest
that loads, never deleted but for the rotation the config asks for (`keep_checkpoints`).

`output_dir/checkpoints/step_N` holds `accelerator.save_state` (every prepared model, optimiser and
scheduler, the registered EMA and counters, the RNG states); `output_dir/model` the EMA weights as a
diffusers model directory plus `noise.json`, which `load_model` reads, `sampling.json`
(`dforce.diffusion.recipe.SamplingRecipe`: how it was validated, which `dforce sample` and `dforce eval`
sample with), and for a latent model `vae.json` (`dforce.data.latents.LatentSpace.of_model`). Under LoRA
the model directory holds the frozen base weights and, beside them, the EMA of the adapters in diffusers'
LoRA file (`dforce.models.lora`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LambdaLR

from dforce import DforceError
from dforce.data.latents import LatentSpace
from dforce.diffusion.noise import NoiseConfig
from dforce.diffusion.recipe import SamplingRecipe
from dforce.models.backbone import BACKBONES, Backbone
from dforce.models.lora import has_lora, load_lora, save_lora_model
from dforce.training.ema import ema_weights

CHECKPOINTS = "checkpoints"
MODEL = "model"
# Wan's own noise process (its scheduler's flow matching over 1000 timesteps, velocity prediction): what a
# plain diffusers Wan folder or a released causal Wan generator, which carry no noise.json, are trained with.
WAN_NOISE = NoiseConfig(schedule="flow", levels=1000, parameterization="flow")
# Self-Forcing's sampling: 4 steps of its generator, x0 noised afresh between them, warped by shift 5.
SELF_FORCING_RECIPE = SamplingRecipe(sampler="renoise", steps=[1000, 750, 500, 250], shift=5.0)


class TrainingStopped(DforceError, RuntimeError):
    """Too many non-finite steps in a row, or no checkpoint can be loaded; nothing is deleted."""


def list_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished ones are hidden `.tmp-*` directories)."""
    found = [p for p in directory.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resume(accelerator: Accelerator, directory: Path) -> Path | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning. The learning
    rates are the config's from the resumed step on: the loaded schedules are rebased on them."""
    # The prepared schedulers, built from the config; `save_state` and `load_state` keep the same list.
    configured = [(s.scheduler, list(s.scheduler.base_lrs)) for s in accelerator._schedulers]
    checkpoints = list_checkpoints(directory)
    for checkpoint in reversed(checkpoints):
        try:
            accelerator.load_state(str(checkpoint))
            for scheduler, base_lrs in configured:
                rebase(scheduler, base_lrs)
            return checkpoint
        except Exception as error:  # any unreadable file: safetensors, pickle, shapes, missing files
            message = f"warning: checkpoint {checkpoint} is damaged ({error}); using the one before"
            accelerator.print(message, file=sys.stderr)
    if checkpoints:
        raise TrainingStopped(
            f"none of the {len(checkpoints)} checkpoints in {directory} can be loaded; "
            "was the config changed? Move them away to start afresh"
        )
    return None


def rebase(scheduler: LambdaLR, base_lrs: list[float]) -> None:
    """Put `base_lrs` under a loaded schedule: lr = base * lambda(step) from its current step on (the
    lambda is the config's own: `LambdaLR` saves its step and base rates, not its function)."""
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    for group, base, lr_lambda in zip(groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def save_checkpoint(accelerator: Accelerator, directory: Path, step: int, keep: int) -> Path:
    """`accelerator.save_state` into a hidden directory, renamed when complete; keep the newest `keep`
    (0: all)."""
    final, partial = directory / f"step_{step:08d}", directory / f".tmp-step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(directory)[:-keep] if keep else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def export_model(
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema: EMAModel,
    noise: NoiseConfig,
    directory: Path,
    space: LatentSpace | None = None,
    recipe: SamplingRecipe | None = None,
) -> None:
    """The EMA weights as a model directory (`write_model`), with the sampling `recipe` it was validated
    with. Under FSDP every rank joins in gathering the whole weights, which the main process writes."""
    with ema_weights(ema, model):
        net = accelerator.unwrap_model(model)
        state = accelerator.get_state_dict(model) if accelerator.is_fsdp2 else None
        if accelerator.is_main_process:
            write_model(net, noise, directory, space, state, recipe)
    accelerator.wait_for_everyone()


def write_model(
    net: torch.nn.Module,
    noise: NoiseConfig,
    directory: Path,
    space: LatentSpace | None = None,
    state: dict[str, torch.Tensor] | None = None,
    recipe: SamplingRecipe | None = None,
) -> None:
    """A diffusers model directory plus `noise.json`, `sampling.json` (the `recipe`, where given) and, for
    a latent model, `vae.json` (which VAE decodes it), replaced atomically; an adapted model's base and
    adapters as `dforce.models.lora` writes them. `state`: the whole weights when `net` does not hold them
    (FSDP's gathered state dict)."""
    partial = directory.with_name(f".tmp-{directory.name}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    if has_lora(net):
        save_lora_model(net, partial, state)
    else:
        if state is not None:
            net = type(net).from_config(net.config)
            net.load_state_dict(state)
        net.save_pretrained(partial)
    noise.save(partial)
    if recipe is not None:
        recipe.save(partial)
    if space is not None:
        space.save(partial)
    old = directory.with_name(f".old-{directory.name}")
    if directory.exists():
        directory.rename(old)
    partial.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


class ModelNotFound(DforceError, FileNotFoundError):
    """A directory that does not hold a trained model."""


def load_model(directory: str | Path) -> tuple[Backbone, NoiseConfig]:
    """A model directory written by training: `save_pretrained` weights and config, `noise.json`, and a
    LoRA run's adapters (`dforce.models.lora.LORA_FILE`), added unmerged."""
    path = Path(directory)
    for name in "config.json", NoiseConfig.FILE:
        if not (path / name).is_file():
            raise ModelNotFound(f"{path}: no {name}; pass a model directory written by `dforce train`")
    name = json.loads((path / "config.json").read_text()).get("_class_name")
    if name not in BACKBONES:
        raise ModelNotFound(f"{path}: model class {name!r} is not one of {', '.join(BACKBONES)}")
    model = BACKBONES[name].from_pretrained(path)
    load_lora(model, path)  # a LoRA run's adapters, beside its base weights
    return model.eval(), NoiseConfig.load(path)


def import_released(
    source: str | Path, base: str | Path, directory: Path, key: str | None = None, **settings: object
) -> str | None:
    """A released causal Wan generator (`dforce.models.released`) as a model directory: Wan's noise
    process, Self-Forcing's sampling recipe and, where the `base` pipeline has a vae/, its latent space;
    -> the checkpoint entry read."""
    from dforce.data.vae import load_vae
    from dforce.models.released import load_released

    model, key = load_released(source, base, key, **settings)
    space = load_vae(base, "vae")[1] if (Path(base) / "vae").is_dir() else None
    write_model(model, WAN_NOISE, directory, space, recipe=SELF_FORCING_RECIPE)
    return key
