"""A model's sampling recipe: how it was validated, saved beside its weights as `sampling.json`.

`dforce train` writes the settings its validation rolled out with (`Config.sampling_recipe`; a self-forcing
generator: the step grid it was trained on, its shift, sink and context noise), so that `dforce sample`,
`dforce eval` and `dforce ablate` sample a model as it was validated unless a flag says otherwise
(`resolve`), and say in one line what they used (`SamplingRecipe.describe`). A model directory written
before recipes has no `sampling.json`: it samples with the defaults here (`dforce sample`: with the 50 steps
it always took, `SAMPLE_DEFAULTS`).

Imports nothing heavy, so that `dforce --help` can show the defaults; the checks read the samplers' and
schedules' own tables when a recipe is made.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEDULE_OWN = ("block", "offset", "chunk")  # what a recipe says of its own schedule only
FLAGS = {"scheduling": "--schedule"}  # the commands' flag of a field, where it is not --field-name


@dataclass
class SamplingRecipe:
    """Everything `dforce.diffusion.rollout.rollout` takes that says how a model samples."""

    sampler: str = "ddim"  # ddim | ddpm | euler | renoise (`dforce.diffusion.sampler.SAMPLERS`)
    eta: float = 0.0  # ddim's stochasticity, 0 (deterministic) .. 1
    steps: int | list[int] = 10  # denoising steps per frame, or the levels each starts from (`step_grid`)
    shift: float | None = None  # timestep shift of the steps (`scheduling_matrix`); None: none (1)
    scheduling: str = "autoregressive"  # a named schedule (`dforce sample` also takes a .json matrix)
    block: int | None = None  # frames denoised together (autoregressive, pyramid); None: one model block
    offset: int | None = None  # pyramid: steps between neighbouring frames
    chunk: int | None = None  # frames per scheduling matrix (`chunk_schedule`'s default if None)
    guidance: float = 1.0  # classifier-free guidance over labels and actions
    history_guidance: float = 1.0  # guidance over the history (> 1 needs a model trained with drop_history)
    text_guidance: float = 1.0  # guidance over the text (> 1 needs a model trained with drop_text)
    context_noise: int = 0  # level at which finished frames are seen
    sink: int = 0  # first frames kept in the KV cache's window for good

    FILE = "sampling.json"

    def __post_init__(self) -> None:  # "field: problem"
        from dforce.diffusion.sampler import Sampler
        from dforce.diffusion.scheduling import SCHEDULING_OPTIONS, step_count

        try:
            Sampler(self.sampler, self.eta)
        except ValueError as error:
            raise ValueError(f"sampler: {error}") from None
        if step_count(self.steps) < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.scheduling not in SCHEDULING_OPTIONS and not self.scheduling.endswith(".json"):
            names = ", ".join(SCHEDULING_OPTIONS)
            raise ValueError(f"scheduling: unknown schedule {self.scheduling!r}; choose from {names}")
        if min(self.context_noise, self.sink) < 0:
            raise ValueError(f"context_noise and sink must be >= 0, got {self.context_noise}, {self.sink}")

    def recipe(self) -> SamplingRecipe:
        """The recipe alone (of a subclass that adds settings of its own, such as `EvalSettings`)."""
        return SamplingRecipe(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingRecipe)})

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE
        path.write_text(json.dumps(dataclasses.asdict(self.recipe()), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> SamplingRecipe | None:
        """The recipe saved in a model directory; None if it has none (written before recipes)."""
        path = Path(directory) / cls.FILE
        if not path.is_file():
            return None
        try:
            return SamplingRecipe(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None

    def override(self, **given: Any) -> SamplingRecipe:
        """This recipe with the settings given (None: not given) over it. The step grid (steps, shift)
        carries to any named schedule given, but what the recipe says of its own schedule (block, offset,
        chunk) does not carry to another, nor any option to a custom matrix, nor its eta to another
        sampler."""
        from dforce.diffusion.scheduling import SCHEDULING_OPTIONS

        given = {key: value for key, value in given.items() if value is not None}
        names = [f.name for f in dataclasses.fields(SamplingRecipe)]
        if unknown := sorted(set(given) - set(names)):
            raise TypeError(f"unknown sampling settings {unknown}; valid: {', '.join(names)}")
        merged = {name: getattr(self, name) for name in names} | given
        if merged["scheduling"] != self.scheduling:
            merged |= {key: given.get(key) for key in SCHEDULE_OWN}
        if merged["scheduling"] not in SCHEDULING_OPTIONS:
            merged |= {key: given.get(key) for key in ("block", "offset", "shift")}
        if merged["sampler"] != self.sampler:
            merged["eta"] = given.get("eta", 0.0)
        return SamplingRecipe(**merged)

    def schedule_kwargs(self) -> dict[str, Any]:
        """`dforce.diffusion.rollout.chunk_schedule`'s keyword arguments: scheduling, steps, chunk and the
        schedule's options that are set."""
        options = {
            key: getattr(self, key) for key in ("block", "offset", "shift") if getattr(self, key) is not None
        }
        return {"scheduling": self.scheduling, "steps": self.steps, "chunk": self.chunk, **options}

    def rollout_kwargs(self) -> dict[str, Any]:
        """`dforce.diffusion.rollout.rollout`'s keyword arguments for this recipe."""
        keys = ("sampler", "eta", "guidance", "history_guidance", "text_guidance", "context_noise", "sink")
        return self.schedule_kwargs() | {key: getattr(self, key) for key in keys}

    def describe(self) -> str:
        """The recipe in a few words, e.g. `ddim, 10 steps, autoregressive, history guidance 1.25`:
        sampler, steps and schedule always, the rest where it differs from the defaults."""
        steps = f"{self.steps} steps" if isinstance(self.steps, int) else f"steps {self.steps}"
        parts = [self.sampler + (f" eta {self.eta:g}" if self.eta else ""), steps]
        if self.shift is not None:
            parts.append(f"shift {self.shift:g}")
        options = [f"{key} {getattr(self, key)}" for key in SCHEDULE_OWN if getattr(self, key) is not None]
        parts.append(" ".join([self.scheduling, *options]))
        for key, words in (
            ("guidance", "label guidance"),
            ("history_guidance", "history guidance"),
            ("text_guidance", "text guidance"),
        ):
            if getattr(self, key) != 1:
                parts.append(f"{words} {getattr(self, key):g}")
        if self.context_noise:
            parts.append(f"context noise {self.context_noise}")
        if self.sink:
            parts.append(f"sink {self.sink}")
        return ", ".join(parts)


# `dforce sample`'s settings for a model without `sampling.json`: the defaults it had before recipes.
SAMPLE_DEFAULTS = SamplingRecipe(steps=50)


def resolve(
    directory: str | Path,
    given: Mapping[str, Any],
    fallback: tuple[SamplingRecipe, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> tuple[SamplingRecipe, str]:
    """The recipe of the model in `directory` with the settings `given` (None: not given) over it, and the
    line that says what was used and whence (`sampling: ... (from the model's sampling.json; --steps
    given)`). A directory without `sampling.json` gives the defaults, or `fallback`: (recipe, whence).
    `flags` names a setting's flag where it is not --setting-name."""
    saved = SamplingRecipe.load(directory)
    base, whence = (saved, f"from the model's {SamplingRecipe.FILE}") if saved else fallback or (None, "")
    recipe = (base or SamplingRecipe()).override(**given)
    source = whence if saved else f"{whence or 'defaults'}: no {SamplingRecipe.FILE} in {directory}"
    names = {**FLAGS, **(flags or {})}
    named = [
        names.get(key, "--" + key.replace("_", "-")) for key, value in given.items() if value is not None
    ]
    if named:
        source += f"; {', '.join(named)} given"
    return recipe, f"sampling: {recipe.describe()} ({source})"
