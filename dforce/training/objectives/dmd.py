"""Self-forcing's parts (seed 000, section 5): the generator's rollout with exit steps, and the
distribution-matching loss against a frozen teacher and a learned critic; pure functions of the models
and seeds, apart from the loop (`dforce.training.objectives.self_forcing`).

Swapping p_data and p_theta in the likelihood gives the reverse KL, whose gradient through a generated
clip x = G(z) is the distribution-matching one (DMD, Yin et al. 2024):

    grad = E_t [ (score_fake(x_t, t) - score_data(x_t, t)) dx_t / dtheta ]
         ~ E_t [ (x0_fake(x_t) - x0_teacher(x_t)) / |x - x0_teacher| ] dx / dtheta

with x_t the generated clip noised to per-frame levels from a trajectory weighting, x0_teacher the frozen
teacher's estimate (history guidance optional) and x0_fake a critic's, trained with the ordinary denoising
loss on generated clips. The generator rolls out exactly as `dforce sample` does (`rollout.generate`: block
by block, KV cache, finished blocks committed detached at the context-noise level, past the horizon with
the rolling cache), except that each block ends at a random exit step whose x0 estimate is the block:
the steps before it run without gradients, and only blocks inside the loss window keep their exit step's
graph. Exit steps and the window come from a seed shared by every process, so every rank's graph is alike.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from dforce.data.text import Text
from dforce.diffusion.history import History, guidance_branches
from dforce.diffusion.loss import DenoisingLoss
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.rollout import chunk_schedule, generate
from dforce.diffusion.sampler import Sampler
from dforce.diffusion.scheduling import step_count
from dforce.diffusion.trajectory import get_weighting
from dforce.models.backbone import Backbone, is_bidirectional
from dforce.training.config import Config, ConfigError, SelfForcingConfig

PLAN = 1  # seed key of the draws every process shares: exit steps and the loss window
# Seed keys of a micro-step's noise streams, drawn independently: the generator's rollout, the noise of the
# distribution-matching state, the critic's denoising loss (one seed for all would noise a generated clip
# with the very noise its rollout started from, on its own path instead of an independent draw).
ROLLOUT, DMD, CRITIC = 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """One rollout's shape: where the loss window starts and where each block exits."""

    window_start: int  # first frame (of context + generated) in the loss window
    exit_rows: list[int]  # per generated block: the scheduling-matrix row whose x0 estimate is the block


def plan_rollout(seed: int, sf: SelfForcingConfig, horizon: int, block: int, total: int) -> Plan:
    """The loss window (`horizon` frames of the `total` rolled out, holding at least one generated frame,
    in whole blocks) and a random exit row in 0..steps-1 per generated block (`exit: shared`: one for all
    of them), from `seed` alone."""
    generator = torch.Generator().manual_seed(seed)
    first = max(0, sf.context_frames - horizon + block) // block  # the window must reach a new block
    last = (total - horizon) // block
    start = int(torch.randint(first, last + 1, (), generator=generator)) * block
    blocks = -(-(start + horizon - sf.context_frames) // block)
    rows = torch.randint(
        0, step_count(sf.steps), (1 if sf.exit == "shared" else blocks,), generator=generator
    )
    return Plan(start, rows.expand(blocks).tolist() if sf.exit == "shared" else rows.tolist())


class SelfForcing:
    """The rollout and the losses of self-forcing, apart from the loop: pure functions of the models and
    seeds. `generator`, `critic` and `teacher` may be wrapped by Accelerate."""

    def __init__(
        self,
        config: Config,
        schedule: NoiseSchedule,
        teacher: Backbone,
        generator: Backbone,
        negative: Text | None = None,
    ) -> None:
        """`teacher` and `generator` unwrapped (their shapes are read); `negative`: the unconditional text
        of the teacher's text guidance (default the null text)."""
        self.sf = sf = config.self_forcing
        self.schedule, self.parameterization = schedule, config.noise.parameterization
        self.negative = negative
        self.horizon, self.block = generator.horizon, generator.frames_per_block  # the rollout's blocks
        self.score_block = teacher.frames_per_block  # the teacher's and the critic's: the loss's blocks
        if sf.context_frames % self.block or sf.sink % self.block:
            raise ConfigError(f"self_forcing.context_frames and sink must be whole blocks of {self.block}")
        self.total = sf.rollout_frames or self.horizon  # context + generated frames per clip
        if not sf.context_frames < self.total or self.total < self.horizon or self.total % self.block:
            raise ConfigError(
                f"self_forcing.rollout_frames={self.total} must be whole blocks of {self.block}, at least "
                f"the horizon {self.horizon} and more than context_frames={sf.context_frames}"
            )
        if sf.text_guidance != 1 and teacher.text_dim is None:
            raise ConfigError(
                "self_forcing.text_guidance: the teacher reads no text (built without text_dim)"
            )
        if sf.guidance != 1 and is_bidirectional(teacher):
            raise ConfigError(
                "self_forcing.guidance: a bidirectional teacher reads no history to guide over; leave it 1"
            )
        if sf.init == "ode" and sf.context_frames % self.score_block:
            raise ConfigError(
                f"self_forcing.context_frames={sf.context_frames}: the ODE init runs the teacher in its "
                f"blocks of {self.score_block} frames (a bidirectional teacher: 0 context frames)"
            )
        if config.data.clip_frames != self.horizon:
            raise ConfigError(
                f"data.clip_frames={config.data.clip_frames} must be the teacher's horizon {self.horizon}"
            )
        self.sampler = Sampler(sf.sampler)
        try:
            self.matrix, self.window = chunk_schedule(
                generator, schedule.levels, "autoregressive", sf.steps, block=self.block, shift=sf.shift
            )
        except ValueError as error:
            raise ConfigError(f"self_forcing.steps: {error}") from None
        weighting = get_weighting(sf.weighting, self.horizon, schedule.levels, self.score_block)
        self.loss = DenoisingLoss(
            schedule,
            self.parameterization,
            weighting,
            level_weight=config.loss.level_weight,
            level_weight_options=config.loss.level_weight_options,
            teacher_layout=config.loss.teacher_layout,
            level_range=(sf.min_level, sf.max_level),
            level_shift=sf.shift,
        )

    def history(
        self, model: nn.Module, batch: dict, guided: bool = False, window: int | None = None
    ) -> History:
        """A rollout's history for the batch's clips: their labels, actions and text; `guided`: with the
        teacher's guidance over the history and the text (against the negative prompt), as
        `distribution_matching` queries it; `window`: frames seen beside those fed (default the rollout's)."""
        guidance = {
            "history_guidance": self.sf.guidance,
            "text_guidance": self.sf.text_guidance,
            "negative": self.negative,
        }
        return History(
            model,
            self.schedule,
            self.parameterization,
            self.window if window is None else window,
            labels=batch.get("label"),
            actions=batch.get("actions"),
            text=Text.of(batch),
            context_noise=self.sf.context_noise,
            sink=self.sf.sink,
            **(guidance if guided else {}),
        )

    def rollout(self, model: nn.Module, batch: dict, seed: int, plan: Plan) -> Tensor:
        """The loss window of a rollout after the batch's context: [B, horizon, C, H, W], carrying the exit
        steps' graphs (when gradients are enabled) for the generated blocks inside it."""
        video = batch["video"]  # [B, T, C, H, W] float on the device
        context = video[:, : self.sf.context_frames]
        history = self.history(model, batch)
        generator = torch.Generator(video.device).manual_seed(seed)
        if len(context[0]):
            history.commit(context, generator)
        before = max(0, plan.window_start - self.sf.context_frames)  # generated frames before the window
        new_frames = plan.window_start + self.horizon - self.sf.context_frames
        exits = plan.exit_rows
        with torch.no_grad():
            head = (
                generate(history, before, self.matrix, self.sampler, video, generator, exits)
                if before
                else None
            )
        tail = generate(
            history,
            new_frames - before,
            self.matrix,
            self.sampler,
            video,
            generator,
            exits[before // self.block :],
        )
        clip = torch.cat([context] + ([head] if head is not None else []) + [tail], dim=1)
        return clip[:, plan.window_start :]

    def distribution_matching(
        self, teacher: nn.Module, critic: nn.Module, clip: Tensor, seed: int, real: int, batch: dict
    ) -> tuple[Tensor, Tensor]:
        """The generator's loss on a window clip [B, T, C, H, W] whose first `real` frames are data: a
        regression whose gradient in `clip` is the normalised score difference; -> (loss, mean |grad|)."""
        labels, actions, text = batch.get("label"), batch.get("actions"), Text.of(batch)
        with torch.no_grad():
            state = self.loss.draw(clip.detach(), seed, labels, actions, text=text)
            x_t, levels = state.inputs["sample"], state.levels
            # The teacher's guidance (`History`'s rule): over the history (pure noise) and the text.
            branches, weights = guidance_branches(
                {"history": self.sf.guidance, "text": self.sf.text_guidance}
            )
            inputs = {None: state.inputs}
            if "history" in branches:
                inputs["history"] = self.loss.draw(
                    clip.detach(), seed, labels, actions, drop_history=True, text=text
                ).inputs
            if "text" in branches:
                inputs["text"] = {**state.inputs, **text.unconditional(self.negative).kwargs()}
            teacher_pred = sum(
                weight * teacher(**inputs[branch]).float()
                for branch, weight in zip(branches, weights, strict=True)
            )
            x0_real = self.schedule.to_x0_eps(teacher_pred, x_t.float(), levels, self.parameterization)[0]
            x0_fake = self.schedule.to_x0_eps(
                critic(**state.inputs).float(), x_t.float(), levels, self.parameterization
            )[0]
            # DMD's normaliser, the mean |x - x0_teacher| over each of the teacher's blocks (one level each):
            # over the whole clip for a bidirectional teacher, as Self-Forcing normalises.
            distance = (clip.detach().float() - x0_real).abs().unflatten(1, (-1, self.score_block))
            scale = distance.mean(dim=(2, 3, 4, 5)).repeat_interleave(self.score_block, 1).clamp(min=1e-6)
            grad = (x0_fake - x0_real) / scale[..., None, None, None]  # [B, T, C, H, W]
            weights = state.weights.clone()
            weights[:, :real] = 0  # data frames are not the generator's
        target = (clip.float() - grad).detach()
        error = 0.5 * (clip.float() - target).square().mean(dim=(2, 3, 4))  # [B, T]
        loss = (error * weights).sum(1).mean()
        return loss, grad.abs().mean()
