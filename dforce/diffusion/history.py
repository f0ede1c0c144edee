"""The frames a rollout has finished and the guided denoiser that reads them (`History`)."""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from dforce.data.text import Text
from dforce.diffusion.noise import NoiseSchedule
from dforce.diffusion.sampler import randn
from dforce.models.backbone import Backbone


def guidance_branches(scales: dict[str, float]) -> tuple[list[str | None], list[float]]:
    """Guidance over named conditions {name: scale}: the branches (None: the conditional one, then the name
    of the condition each other branch drops, one per scale != 1) and their weights, so that
    sum(weight * pred) = c + sum over conditions of (scale - 1)(c - u_condition)."""
    dropped = [name for name, scale in scales.items() if scale != 1]
    weights = [1.0 + sum(scales[name] - 1 for name in dropped)] + [1.0 - scales[name] for name in dropped]
    return [None, *dropped], weights


def _per_branch(value: Tensor | None, null: Tensor | None, drops: list[bool]) -> Tensor | None:
    """`value` [B, ...] for each branch, `null` where the branch drops it: [branches * B, ...]."""
    return None if value is None else torch.cat([null if drop else value for drop in drops])


class History:
    """The frames a rollout has finished, as the model sees them, and the guided denoiser that reads them.

    `commit` writes finished clean frames once, at the context-noise level; `denoise` predicts (x0, eps)
    for the frames being generated, placed right after the committed ones. The model sees the last `window`
    committed frames: with `use_cache` through a rolling KV cache (each frame's keys and values computed
    once, by a forward at the context-noise level with `update_cache=True`), otherwise by feeding them again
    with every call (the reference). With the cache, the first `sink` frames stay in the window for good.
    `denoise` may run with gradients; `commit` never keeps them.

    Guidance runs its branches as one batch (and one cache) of `branches * B` (`guidance_branches`):
      history guidance w: the unconditional branch sees every committed frame at level K (pure noise);
      label/action guidance g: the unconditional branch has label `num_classes` ("no label") and zero
      actions (the model has no null action embedding, so zero is what "no action" means);
      text guidance s: the unconditional branch has the null text (no tokens, `Text.null`), or the
      `negative` prompt (`Text.unconditional`);
    pred = c + (g - 1)(c - u_label) + (s - 1)(c - u_text) + (w - 1)(c - u_history), each term applied only
    when its scale != 1.

    `model` may be wrapped for distributed training (self-forcing): it is called as given, so that its
    gradients are synchronised, and its attributes are read from the unwrapped `net`.
    """

    def __init__(
        self,
        model: Backbone,
        schedule: NoiseSchedule,
        parameterization: str,
        window: int,
        *,
        labels: Tensor | None = None,
        actions: Tensor | None = None,
        guidance: float = 1.0,
        history_guidance: float = 1.0,
        text: Text | None = None,
        text_guidance: float = 1.0,
        negative: Text | None = None,
        context_noise: int = 0,
        use_cache: bool = True,
        sink: int = 0,
    ) -> None:
        if sink and not use_cache:
            raise ValueError("a sink (frames kept in the window for good) needs the KV cache")
        if not 0 <= context_noise <= schedule.levels:
            raise ValueError(f"context_noise must be a level in 0..{schedule.levels}, got {context_noise}")
        if guidance != 1 and labels is None and actions is None:
            raise ValueError("guidance needs labels or actions to drop; got neither")
        if text_guidance != 1 and text is None:
            raise ValueError("text guidance needs text to drop; got none")
        self.model, self.parameterization, self.window = model, parameterization, window
        self.net = model = extract_model_from_parallel(model)
        if labels is not None and model.null_label is None:
            raise ValueError("labels given to a model built without num_classes")
        if text is not None and model.text_dim is None:
            raise ValueError("text given to a model built without text_dim")
        device = model.device
        self.schedule = schedule.to(device)
        scales = {"labels": guidance, "text": text_guidance, "history": history_guidance}
        branches, self.weights = guidance_branches(scales)
        self.levels = [schedule.levels if name == "history" else context_noise for name in branches]
        drops = [name == "labels" for name in branches]
        null_labels = None if labels is None else torch.full_like(labels, model.null_label)
        self.labels = _per_branch(labels, null_labels, drops)  # [branches * B]
        null_actions = None if actions is None else torch.zeros_like(actions)
        self.actions = _per_branch(actions, null_actions, drops)  # [branches * B, frames, A]
        self.text = (
            None
            if text is None
            else Text.cat([text.unconditional(negative) if name == "text" else text for name in branches]).to(
                device
            )
        )  # [branches * B, L, D], [branches * B, L]
        self.cache = model.new_cache(window, sink) if use_cache else None
        self.frames: Tensor | None = None  # without a cache: [branches * B, <= window, C, H, W] as fed
        self.timesteps: Tensor | None = None  # [branches * B, <= window]
        self.end = 0  # absolute index of the next frame

    @property
    def branches(self) -> int:
        return len(self.weights)

    def _actions(self, start: int, frames: int) -> Tensor | None:
        return None if self.actions is None else self.actions[:, start : start + frames]

    def _conditions(self, start: int, frames: int) -> dict:
        """The model's keyword arguments besides the frames: labels, actions of frames start.., text."""
        text = {} if self.text is None else self.text.kwargs()
        return {"labels": self.labels, "actions": self._actions(start, frames), **text}

    def commit(self, frames: Tensor, generator: torch.Generator | None = None) -> None:
        """Finished clean frames [B, n, C, H, W], n a multiple of `frames_per_block`, join the history."""
        frames = frames.detach()
        batch, n = frames.shape[:2]
        noise = randn(frames, generator) if any(self.levels) else None
        fed, timesteps = [], []
        for level in self.levels:
            levels = torch.full((batch, n), level, device=frames.device)  # [B, n]
            fed.append(self.schedule.add_noise(frames, noise, levels) if level else frames)
            timesteps.append(self.schedule.timesteps(levels))
        fed, timesteps = torch.cat(fed), torch.cat(timesteps)  # [branches * B, n, C, H, W], [branches * B, n]
        if self.cache is not None:
            with torch.no_grad():
                self.model(
                    fed, timesteps, cache=self.cache, update_cache=True, **self._conditions(self.end, n)
                )
        else:
            if self.frames is not None:
                fed, timesteps = torch.cat([self.frames, fed], 1), torch.cat([self.timesteps, timesteps], 1)
            keep = max(0, fed.shape[1] - self.window)
            self.frames, self.timesteps = fed[:, keep:], timesteps[:, keep:]
        self.end += n

    def denoise(self, x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, eps) [B, n, C, H, W] for frames x [B, n, C, H, W] at `levels` [B, n] following the history."""
        n = x.shape[1]
        sample = x.repeat(self.branches, 1, 1, 1, 1)  # [branches * B, n, C, H, W]
        timesteps = self.schedule.timesteps(levels).repeat(self.branches, 1)  # [branches * B, n]
        if self.cache is not None:
            out = self.model(sample, timesteps, cache=self.cache, **self._conditions(self.end, n))
        else:
            start = self.end - (0 if self.frames is None else self.frames.shape[1])
            if self.frames is not None:
                sample = torch.cat([self.frames, sample], 1)
                timesteps = torch.cat([self.timesteps, timesteps], 1)
            conditions = self._conditions(start, sample.shape[1])
            out = self.model(sample, timesteps, frame_offset=start, **conditions)[:, -n:]
        if self.branches == 1:
            pred = out
        else:
            pred = sum(w * part for w, part in zip(self.weights, out.chunk(self.branches), strict=True))
        return self.schedule.to_x0_eps(pred, x, levels, self.parameterization)
