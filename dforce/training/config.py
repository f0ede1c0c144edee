"""Training configs: a dataclass tree filled from a YAML file, then from `dotted.key=value` overrides.

Every key is checked against the tree, and every name in it against the table the code uses
(`check_names`): an unknown key or name, a wrong type or a missing file raises `ConfigError`, whose
one-line message names the file, the dotted key and the valid choices. The `model` section is checked
against its backbone's builder itself (`CausalVideoTransformer.__init__`, or `dforce.models.wan.build_wan` for
`backbone: wan`), so its keys are the model's own argument names.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from diffusers.optimization import SchedulerType, get_scheduler

from dforce.data.clips import DataConfig
from dforce.diffusion.noise import NoiseConfig
from dforce.diffusion.recipe import SamplingRecipe
from dforce.diffusion.scheduling import scheduling_matrix, step_grid
from dforce.diffusion.trajectory import get_weighting
from dforce.models.backbone import BUILDERS
from dforce.models.lora import LoraConfig
from dforce.training.tree import ConfigError, build, coerce

# fp16's loss scaling would fight the non-finite-step skip, so a run trains in fp32 or bf16.
PRECISIONS = ("no", "bf16")


@dataclass
class TrajectoryConfig:
    """Which paths through the noise-level cube the loss weights
    (`dforce.diffusion.trajectory.get_weighting`)."""

    name: str = "paths"  # independent | paths | teacher | sync | schedule:NAME | mixture
    cube_levels: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # e.g. components: {paths: 0.5, teacher: 0.5}


@dataclass
class LossConfig:
    level_weight: str = "simple"  # simple | elbo | min_snr | sigmoid (`NoiseSchedule.loss_weight`)
    level_weight_options: dict[str, float] = field(default_factory=dict)
    teacher_layout: bool = True  # `teacher` weighting: train every frame of the staircase in one forward
    drop_history: float = 0.0  # chance a clip's context frames are replaced by pure noise (history guidance)
    drop_labels: float = 0.0  # chance a clip's label is replaced by the null label (classifier-free guidance)
    context_noise: int = 0  # teacher layout: context frames at levels 0..context_noise (against drift)
    drop_text: float = 0.0  # chance a clip's text is replaced by the null text (no tokens): text guidance

    def __post_init__(self) -> None:
        for key in ("drop_history", "drop_labels", "drop_text"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}: must lie in [0, 1], got {getattr(self, key)}")


@dataclass
class TrainConfig:
    max_steps: int
    checkpoint_every: int
    batch_size: int  # clips per process and micro-step
    gradient_accumulation: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # any `diffusers.optimization.get_scheduler` name
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0  # the EMA copies the weights until this step, then averages (Self-Forcing: 200)
    mixed_precision: str | None = None  # no | bf16; None: the launch's (accelerate launch --mixed_precision)
    frozen_fp32: bool = False  # keep frozen weights (LoRA base, teacher) in fp32 under bf16, not in bf16
    gradient_checkpointing: bool = False
    attention_backend: str = "auto"  # auto | flex | sdpa
    compile: bool | None = None  # regional torch.compile; None: on CUDA only
    keep_checkpoints: int = 3  # the newest N; 0 keeps every checkpoint
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops
    log_every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # any installed Accelerate tracker
    project: str = "dforce"  # the trackers' project
    run_name: str | None = None  # the trackers' run name; None: the output directory's name
    lora: LoraConfig | None = (
        None  # train adapters over a frozen base (`dforce.models.lora`); None: every weight
    )

    def __post_init__(self) -> None:
        for key in ("max_steps", "checkpoint_every", "batch_size", "gradient_accumulation", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.mixed_precision not in (None, *PRECISIONS):
            raise ValueError(
                f"mixed_precision: must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}"
            )
        if self.attention_backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attention_backend: must be auto, flex or sdpa, got {self.attention_backend!r}")
        if self.keep_checkpoints < 0:
            raise ValueError(f"keep_checkpoints: must be >= 0 (0 keeps all), got {self.keep_checkpoints}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        if self.ema_start < 0:
            raise ValueError(f"ema_start: must be >= 0, got {self.ema_start}")


@dataclass
class ValidationConfig:
    """Held-out loss per weighting, and rollouts from held-out context frames."""

    shards: str | list[str] | None = None  # None: no validation
    every: int = 500  # steps; also at the end
    batches: int = 4
    weightings: list[str] = field(default_factory=lambda: ["paths", "teacher", "sync"])
    rollout_clips: int = 2  # rollouts written as GIF/MP4; 0 for none
    context_frames: int = 4
    rollout_frames: int = 32
    sampling_steps: int = 10
    scheduling: str = "autoregressive"
    context_noise: int = 0  # level at which finished frames are seen (`rollout`'s context_noise)
    history_guidance: float = 1.0  # > 1: sampled frames pushed away from the history-free prediction

    def __post_init__(self) -> None:
        if self.history_guidance < 1:
            raise ValueError(f"history_guidance: must be >= 1 (1: none), got {self.history_guidance}")


@dataclass
class SelfForcingConfig:
    """`objective: self_forcing`: a few-step generator trained on its own rollouts (`dforce.self_forcing`)."""

    # The frozen teacher: a model directory written by `dforce train` (causal, or attending to its whole
    # horizon: frames_per_block = num_frames), or a diffusers Wan 2.1 / SkyReels-V2 folder (pipeline root or
    # its transformer/), taken as the bidirectional full-sequence model it is
    teacher: str
    generator: str | None = None  # a dforce model directory the generator starts from; default the teacher
    critic: str | None = None  # the critic's starting weights, in the teacher's architecture; default its own
    frames_per_block: int | None = (
        None  # the generator's blocks; default the teacher's (required if bidirectional)
    )
    sample_size: list[int] | None = None  # a diffusers folder's latent [height, width] (its config has none)
    init: str = "teacher"  # teacher | ode (first regress onto the teacher's many-step ODE samples)
    ode_steps: int = 200  # generator updates of the ODE regression
    ode_sampling_steps: int = 40  # the teacher's DDIM steps per frame for its ODE samples
    ode_shift: float = 1.0  # timestep shift of those steps (Self-Forcing's ODE pairs: 48 steps, shift 8)
    steps: int | list[int] = 4  # the generator's steps per block: a count, or the levels each starts from
    shift: float = 1.0  # timestep shift of those steps and of the distribution-matching levels
    sampler: str = "ddim"  # the generator's step: ddim (deterministic) | renoise (x0 noised afresh)
    context_frames: int = 1  # real frames the rollouts continue (0: from nothing)
    rollout_frames: int | None = None  # frames rolled out per clip; default the horizon, may exceed it
    sink: int = 0  # first frames kept in the rolling KV cache for good (whole blocks)
    context_noise: int = 0  # level at which finished frames are seen, as in `dforce sample`
    critic_steps: int = 5  # critic updates per generator update
    critic_lr: float | None = None  # default train.lr
    # the critic's AdamW and clipping, each default train's (Self-Forcing: betas (0, 0.999), clip 10)
    critic_betas: tuple[float, float] | None = None
    critic_weight_decay: float | None = None
    critic_max_grad_norm: float | None = None
    exit: str = "per_block"  # per_block: each generated block exits at its own random step | shared: one
    # the weighting the distribution-matching and critic levels are drawn from, over the teacher's blocks:
    # sync, one level per clip (Self-Forcing's); teacher, the staircase after a clean history
    weighting: str = "sync"
    min_level: int = 20  # the distribution-matching levels are clamped to min_level..max_level
    max_level: int = 980
    guidance: float = 1.0  # history guidance of the teacher (needs a teacher trained with drop_history)
    text_guidance: float = 1.0  # text guidance of the teacher (needs a teacher trained with drop_text)
    negative_prompt: str | None = (
        None  # its unconditional text: `dforce encode-text --prompt` file; default none
    )

    def __post_init__(self) -> None:
        if self.init not in ("teacher", "ode"):
            raise ValueError(f"init: must be teacher or ode, got {self.init!r}")
        if self.exit not in ("per_block", "shared"):
            raise ValueError(f"exit: must be per_block or shared, got {self.exit!r}")
        if self.sampler not in ("ddim", "renoise"):
            raise ValueError(f"sampler: must be ddim or renoise, got {self.sampler!r}")
        if self.frames_per_block is not None and self.frames_per_block < 1:
            raise ValueError(f"frames_per_block: must be >= 1, got {self.frames_per_block}")
        if self.sample_size is not None and len(self.sample_size) != 2:
            raise ValueError(f"sample_size: [height, width] of a latent frame, got {self.sample_size}")
        for key in ("critic_steps", "ode_sampling_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if min(self.context_frames, self.sink, self.context_noise, self.ode_steps) < 0:
            raise ValueError("context_frames, sink, context_noise and ode_steps must be >= 0")
        if not 0 < self.min_level <= self.max_level:
            raise ValueError(f"need 0 < min_level <= max_level, got {self.min_level}, {self.max_level}")


@dataclass
class Config:
    output_dir: str
    seed: int
    train: TrainConfig
    data: DataConfig
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: dict[str, Any] = field(default_factory=dict)  # `backbone` (dforce | wan) and its builder's keys
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    objective: str = "denoising"  # denoising | self_forcing (needs the self_forcing section)
    self_forcing: SelfForcingConfig | None = None

    def __post_init__(self) -> None:
        if self.objective not in ("denoising", "self_forcing"):
            raise ValueError(f"objective: must be denoising or self_forcing, got {self.objective!r}")
        if self.objective == "self_forcing" and self.self_forcing is None:
            raise ValueError("self_forcing: objective self_forcing needs this section (at least its teacher)")
        guided = self.validation.history_guidance != 1
        if self.objective == "denoising" and guided and not self.loss.drop_history:
            raise ValueError("validation.history_guidance: needs loss.drop_history > 0 (history-free branch)")

    def sampling_recipe(self) -> SamplingRecipe:
        """How the model this config trains samples, as its validation rolls it out and its model directory
        records it (`sampling.json`): the validation section's steps, schedule, context noise and history
        guidance; a self-forcing generator autoregressive on the step grid it is trained on (its steps and
        shift), with its sink and context noise."""
        val = self.validation
        recipe = SamplingRecipe(
            steps=val.sampling_steps,
            scheduling=val.scheduling,
            context_noise=val.context_noise,
            history_guidance=val.history_guidance,
        )
        if self.objective == "self_forcing" and self.self_forcing is not None:
            sf = self.self_forcing
            recipe = dataclasses.replace(
                recipe,
                scheduling="autoregressive",
                sampler=sf.sampler,
                steps=sf.steps,
                shift=sf.shift,
                sink=sf.sink,
                context_noise=sf.context_noise,
            )
        return recipe


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `path`, apply `key.sub=value` overrides (values parsed as YAML), check and build the tree."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(raw).__name__}")
    for override in overrides:
        key, eq, text = override.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {override!r} is not key=value (e.g. train.max_steps=200)")
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {'.'.join(parents[: depth + 1])} is not a section")
        node[leaf] = yaml.safe_load(text) if text else None
    try:
        if isinstance(raw.get("model", {}), dict):  # its keys are its builder's arguments
            raw["model"] = _check_model(raw.get("model", {}))
        config = build(Config, raw, "")
        check_names(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config


def check_names(config: Config) -> None:
    """Build, once and small, everything the config names that is cheap to build (weightings, scheduling
    matrices, level weights, the lr schedule) and look up its trackers, so that a bad name or option
    fails now, naming its key and the valid choices, not after the model is built or at the first
    validation. The tables are those the code uses: no second list to keep in step."""
    frames, levels, val = config.data.clip_frames, config.noise.levels, config.validation
    trajectory, block = config.trajectory, config.model.get("frames_per_block", 1)

    def weighting(name: str, **options: Any) -> Callable[[], object]:
        cube = trajectory.cube_levels
        return lambda: get_weighting(name, frames, levels, block, cube_levels=cube, **options)

    checks = {"trajectory.name": weighting(trajectory.name, **trajectory.options)}
    checks |= {f"validation.weightings[{i}]": weighting(name) for i, name in enumerate(val.weightings)}
    checks["validation.scheduling"] = lambda: scheduling_matrix(
        val.scheduling, frames, levels, val.sampling_steps
    )
    checks["loss.level_weight"] = lambda: config.noise.build().loss_weight(
        config.loss.level_weight,
        torch.arange(levels + 1),
        config.noise.parameterization,
        **config.loss.level_weight_options,
    )
    checks["train.lr_scheduler"] = lambda: _lr_schedule(config.train)
    checks |= {
        f"train.trackers[{i}]": lambda name=name: _tracker(name)
        for i, name in enumerate(config.train.trackers)
    }
    if config.self_forcing is not None:
        sf = config.self_forcing
        checks["self_forcing.weighting"] = weighting(sf.weighting)
        # the teacher's levels where its noise.json says (a diffusers folder: Wan's 1000, the default)
        saved = Path(sf.teacher) / NoiseConfig.FILE
        sf_levels = NoiseConfig.load(sf.teacher).levels if saved.is_file() else levels
        checks["self_forcing.steps"] = lambda: step_grid(sf.steps, sf_levels, sf.shift)
        checks["self_forcing.ode_sampling_steps"] = lambda: step_grid(
            sf.ode_sampling_steps, sf_levels, sf.ode_shift
        )
    for key, check in checks.items():
        try:
            check()
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{key}: {error}") from None


def _lr_schedule(cfg: TrainConfig) -> None:
    names = [kind.value for kind in SchedulerType]
    if cfg.lr_scheduler not in names:
        raise ValueError(f"unknown lr scheduler {cfg.lr_scheduler!r}; valid: {', '.join(names)}")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )


def _tracker(name: str) -> None:
    if name not in LOGGER_TYPE_TO_CLASS:
        raise ValueError(f"unknown tracker {name!r}; valid: {', '.join(LOGGER_TYPE_TO_CLASS)}")
    if name not in {getattr(kind, "value", kind) for kind in get_available_trackers()}:
        raise ValueError(f"tracker {name!r} is not installed here (pip install {name}), or leave it out")


def model_kwargs(config: Config) -> dict[str, Any]:
    """The model section with its implied defaults: the horizon is the clip length of the data."""
    return {"num_frames": config.data.clip_frames, **config.model}


def _check_model(raw: dict[str, Any]) -> dict[str, Any]:
    """The section's keys against its backbone's builder (`dforce.models.backbone.BUILDERS`), then what that
    backbone checks without building."""
    backbone = raw.get("backbone", "dforce")
    if backbone not in BUILDERS:
        raise ConfigError(f"model.backbone: unknown backbone {backbone!r}; valid: {', '.join(BUILDERS)}")
    builder = BUILDERS[backbone]
    init = builder.build.__init__ if isinstance(builder.build, type) else builder.build
    hints = typing.get_type_hints(init)
    valid = [*(name for name in inspect.signature(init).parameters if name != "self"), "backbone"]
    checked = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(f"model.{key}: unknown key; valid keys: {', '.join(valid)}")
        checked[key] = value if key == "backbone" else coerce(value, hints[key], f"model.{key}")
    if builder.check is not None:
        try:
            builder.check(**{key: value for key, value in checked.items() if key != "backbone"})
        except ValueError as error:
            raise ConfigError(f"model.{error}") from None
    return checked
