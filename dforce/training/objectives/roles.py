"""Self-forcing's three models, built from the config before anything is prepared.

The frozen teacher is a dforce model directory (causal, or attending to its whole horizon:
`frames_per_block == num_frames`) or a plain diffusers Wan 2.1 / SkyReels-V2 folder, which is taken as the
bidirectional full-sequence model it is: full attention over the clip, one level per clip, its own text
conditioning (Self-Forcing's and CausVid's real score). A teacher whose one block is its horizon is
"bidirectional": it scores a whole rolled-out clip at once instead of reading the generated history.

The generator is causal, in blocks of `self_forcing.frames_per_block` frames; it starts from
`self_forcing.generator` or from the teacher's weights. The critic has the teacher's architecture (it scores
the same states) and starts from `self_forcing.critic` or the teacher's weights. Under `train.lora` the
roles that start from the teacher's weights are module trees over its one frozen copy
(`dforce.models.lora.share_base`), whatever their blocks: the same weights attend in other blocks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from dforce.data.latents import LatentSpace, hash_config
from dforce.diffusion.noise import NoiseConfig
from dforce.models.backbone import Backbone, is_bidirectional
from dforce.models.lora import merge_lora, share_base
from dforce.models.wan import TRANSFORMERS, CausalWan, transformer_folder
from dforce.training.checkpoint import WAN_NOISE, load_model
from dforce.training.config import ConfigError, SelfForcingConfig


@dataclass
class Roles:
    teacher: Backbone  # frozen, merged
    generator: Backbone  # causal in blocks, trainable (before adapters)
    critic: Backbone  # the teacher's architecture, trainable (before adapters)
    noise: NoiseConfig  # the teacher's

    @property
    def bidirectional(self) -> bool:
        return is_bidirectional(self.teacher)


def load_teacher(
    sf: SelfForcingConfig, horizon: int, space: LatentSpace | None
) -> tuple[Backbone, NoiseConfig]:
    """The frozen teacher of `self_forcing.teacher` (see the module's docstring), checked against the data's
    latent `space`; a diffusers folder over `horizon` latent frames of `self_forcing.sample_size`."""
    path = Path(sf.teacher)
    if (path / NoiseConfig.FILE).is_file():
        teacher_space = LatentSpace.of_model(path)
        if (teacher_space is None) != (space is None) or (
            teacher_space is not None and teacher_space.mismatch(space)
        ):
            kinds = [
                "videos" if s is None else f"latents of {s.vae_class} {s.config_hash[:12]}"
                for s in (teacher_space, space)
            ]
            raise ConfigError(
                f"self_forcing.teacher: {path} was trained on {kinds[0]}, data.shards hold {kinds[1]}"
            )
        teacher, noise = load_model(path)
        if sf.sample_size is not None and list(sf.sample_size) != list(teacher.frame_shape[1:]):
            raise ConfigError(
                f"self_forcing.sample_size: {sf.sample_size}, but the teacher {path} reads frames of "
                f"{list(teacher.frame_shape[1:])}"
            )
        return merge_lora(teacher), noise  # a LoRA-trained teacher as a plain model
    folder = transformer_folder(path)
    if folder is None:
        raise ConfigError(
            f"self_forcing.teacher: {path} holds neither a dforce model (no {NoiseConfig.FILE}) nor a "
            f"diffusers transformer of class {' or '.join(TRANSFORMERS)} (in config.json or "
            "transformer/config.json)"
        )
    vae = folder.parent / "vae" / "config.json"  # a pipeline's VAE: its latents are the data's
    if vae.is_file() and space is None:
        raise ConfigError(f"data.shards: videos; the teacher {path} reads latents of {vae.parent}")
    if vae.is_file() and hash_config(json.loads(vae.read_text())) != space.config_hash:
        raise ConfigError(
            f"data.shards: latents of another VAE ({space.vae_class} from {space.path}) than {vae.parent}'s"
        )
    if sf.sample_size is None:
        raise ConfigError(
            f"self_forcing.sample_size: {path} is a diffusers folder, which does not say its latent "
            "frame size; give [height, width] (Wan at 480x832: [60, 104])"
        )
    teacher = CausalWan.from_pretrained(
        folder, num_frames=horizon, frames_per_block=horizon, sample_size=tuple(sf.sample_size)
    )
    return teacher.eval(), WAN_NOISE


def copy_of(model: Backbone, share: bool, **config: object) -> Backbone:
    """`model`'s weights in a model of its class with `config` over its config (frames_per_block,
    num_frames: what does not change the weights): the same frozen tensors (`share`), or a trainable copy."""
    if share:
        return share_base(model, **config)
    return share_base(copy.deepcopy(model), **config).requires_grad_(True)


def build_roles(sf: SelfForcingConfig, lora: bool, horizon: int, space: LatentSpace | None) -> Roles:
    """The teacher, the generator and the critic of the config (module docstring); ConfigError naming the
    key whose models do not fit together. `lora`: the roles that start from the teacher share its weights."""
    teacher, noise = load_teacher(sf, horizon, space)
    teacher.requires_grad_(False)
    if teacher.horizon != horizon:
        raise ConfigError(f"data.clip_frames={horizon} must be the teacher's horizon {teacher.horizon}")
    bidirectional = is_bidirectional(teacher)
    if sf.generator is not None:
        generator, generator_noise = load_model(sf.generator)
        generator = merge_lora(generator)
        if generator_noise != noise:
            raise ConfigError(
                f"self_forcing.generator: {sf.generator} has another noise process than the teacher"
            )
        if sf.frames_per_block not in (None, generator.frames_per_block):
            raise ConfigError(
                f"self_forcing.frames_per_block: {sf.frames_per_block}, but the generator {sf.generator} has "
                f"blocks of {generator.frames_per_block}"
            )
    else:
        block = sf.frames_per_block or (None if bidirectional else teacher.frames_per_block)
        if block is None:
            raise ConfigError(
                "self_forcing.frames_per_block: the teacher attends to its whole horizon; give the causal "
                "generator's blocks (Self-Forcing: 3 latent frames)"
            )
        try:
            generator = copy_of(teacher, lora, frames_per_block=block)
        except ValueError as error:  # blocks that do not divide the horizon
            raise ConfigError(f"self_forcing.frames_per_block: {error}") from None
    if generator.horizon != teacher.horizon or generator.frame_shape != teacher.frame_shape:
        raise ConfigError(
            f"self_forcing.generator: frames {generator.frame_shape} over {generator.horizon}, the teacher's "
            f"{teacher.frame_shape} over {teacher.horizon}"
        )
    if not bidirectional and generator.frames_per_block != teacher.frames_per_block:
        raise ConfigError(
            f"self_forcing.frames_per_block: a causal teacher scores the generator's blocks; its blocks of "
            f"{teacher.frames_per_block} must be the generator's ({generator.frames_per_block})"
        )
    if sf.critic is None:
        critic = copy_of(teacher, lora)
    else:
        start, critic_noise = load_model(sf.critic)
        if critic_noise != noise:
            raise ConfigError(f"self_forcing.critic: {sf.critic} has another noise process than the teacher")
        critic = copy_of(merge_lora(start), True, **architecture(teacher)).requires_grad_(not lora)
    return Roles(teacher=teacher, generator=generator, critic=critic, noise=noise)


def architecture(model: Backbone) -> dict[str, int]:
    """What of a model's config its role decides: its horizon and blocks."""
    return {"num_frames": model.horizon, "frames_per_block": model.frames_per_block}
