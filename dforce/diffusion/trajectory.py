"""Trajectory weightings over the noise-level cube {0..K}^n.

A state is the vector of per-frame levels s = (k_1..k_n); generation walks a monotone path
from (K..K) to (0..0), and the training loss is the expected sum of the KL terms of the path's
edges (seed 000, eqs 9-16). A *weighting* is a distribution over such paths. A causal
transformer scores every edge leaving a state in one forward pass, so a weighting is
trained by drawing a state and weighting each frame's denoising loss by the chance that the
path leaves the state through that frame.

Normalisation used throughout: `edge_probability(s, j)` is the expected fraction of a path's
n*K one-level decrements that lower frame j at state s (it sums to 1 over all pairs), and
`sample` is scaled so that E[weights[:, j] * 1[levels == s]] == edge_probability(s, j) exactly.
Every weighting thus has the same loss scale (the mean KL per edge), and mixtures are exact.

Inference follows a single path, a scheduling matrix (`dforce.diffusion.scheduling`); `schedule:NAME` trains
on one.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

from dforce.diffusion.counting import hypergeometric, log_multinomial, multinomial
from dforce.diffusion.scheduling import scheduling_matrix

# Below this many decrements per path (n * K), `edge_probability` uses exact integer arithmetic.
EXACT_LIMIT = 64


def _device(generator: torch.Generator | None) -> torch.device | None:
    """Random tensors are made where their generator lives."""
    return generator.device if generator is not None else None


def _rand(shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, device=_device(generator))


def _randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    return torch.randint(low, high, shape, generator=generator, device=_device(generator))


class Weighting(ABC):
    """A distribution over monotone paths through the cube {0..cube_levels}^frames.

    `levels` is the diffusion's number of levels K; the cube has its own resolution
    `cube_levels` (default K). A coarser cube keeps the uniform-paths marginal from collapsing
    onto the diagonal (its relative spread is ~1/sqrt(K)); cube bin c >= 1 is mapped to a
    diffusion level drawn uniformly from the levels it covers, one draw per (sample, bin) so
    that frames sharing a bin share a level and the path's shape is kept.
    """

    name: ClassVar[str]
    block: int = 1  # frames that share a level: the unit of the cube (`Blocked`)

    def __init__(self, frames: int, levels: int, cube_levels: int | None = None) -> None:
        cube_levels = levels if cube_levels is None else cube_levels
        if frames < 1 or levels < 1:
            raise ValueError(f"frames and levels must be >= 1, got frames={frames}, levels={levels}")
        if not 1 <= cube_levels <= levels:
            raise ValueError(f"cube_levels must be in 1..levels={levels}, got {cube_levels}")
        self.frames, self.levels, self.cube_levels = frames, levels, cube_levels

    def __repr__(self) -> str:
        return f"{type(self).__name__}(frames={self.frames}, levels={self.levels}, cube={self.cube_levels})"

    @property
    def base(self) -> Weighting:
        """The weighting over the cube's units: itself, or for `Blocked` the one over its blocks."""
        return self

    @property
    def decrements(self) -> int:
        """One-level decrements in a path: n * K on the cube."""
        return self.frames * self.cube_levels

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw `batch` states and per-frame loss weights: (levels [B, n] long, weights [B, n] float)."""
        cube, weights = self.sample_cube(batch, generator)
        return self.to_levels(cube, generator), weights

    @abstractmethod
    def sample_cube(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """As `sample`, but states on the cube grid 0..cube_levels."""

    def edge_probability(
        self, state: Sequence[int] | Tensor, frame: int, exact: bool = False
    ) -> float | Fraction:
        """Expected fraction of a path's n*K decrements that lower `frame` at cube `state`."""
        state = self._check_state(state, frame)
        if exact:
            return self._exact(state, frame)
        return self._float(state, frame)

    @abstractmethod
    def _exact(self, state: tuple[int, ...], frame: int) -> Fraction:
        """The edge probability as an exact fraction."""

    def _float(self, state: tuple[int, ...], frame: int) -> float:
        return float(self._exact(state, frame))

    def to_cube(self, levels: Tensor) -> Tensor:
        """Diffusion levels -> cube bins: bin c covers levels (floor((c-1)K/Kc), floor(cK/Kc)]."""
        return torch.div(levels * self.cube_levels + self.levels - 1, self.levels, rounding_mode="floor")

    def to_levels(self, cube: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Cube bins [B, n] -> diffusion levels [B, n], uniform within each bin, bin 0 -> level 0."""
        if self.cube_levels == self.levels:
            return cube
        lo = torch.div((cube - 1).clamp(min=0) * self.levels, self.cube_levels, rounding_mode="floor") + 1
        hi = torch.div(cube * self.levels, self.cube_levels, rounding_mode="floor")
        u = _rand((cube.shape[0], self.cube_levels + 1), generator).gather(1, cube)  # [B, n], shared per bin
        jittered = lo + (u * (hi - lo + 1)).long().clamp(max=hi - lo)
        return torch.where(cube > 0, jittered, torch.zeros_like(cube))

    def _check_state(self, state: Sequence[int] | Tensor, frame: int) -> tuple[int, ...]:
        state = tuple(int(k) for k in (state.tolist() if isinstance(state, Tensor) else state))
        if len(state) != self.frames or not all(0 <= k <= self.cube_levels for k in state):
            raise ValueError(f"state must hold {self.frames} levels in 0..{self.cube_levels}, got {state}")
        if not 0 <= frame < self.frames:
            raise ValueError(f"frame must be in 0..{self.frames - 1}, got {frame}")
        return state


class Independent(Weighting):
    """Original Diffusion Forcing: every edge of the cube equally; levels drawn iid uniform."""

    name = "independent"

    def sample_cube(self, batch, generator=None):
        n, K = self.frames, self.cube_levels
        cube = _randint(0, K + 1, (batch, n), generator)  # [B, n]
        weights = (cube > 0).float() * ((K + 1) / (n * K))
        return cube, weights

    def _exact(self, state, frame):
        n, K = self.frames, self.cube_levels
        return Fraction(int(state[frame] > 0), n * K * (K + 1) ** (n - 1))


class Paths(Weighting):
    """Uniform over all unit-step paths (seed 000, eqs 19-20).

    P(s -> s - e_j) = multinom(K - s) * multinom(s - e_j) / multinom(K..K); the state after t
    steps is K - Hypergeometric([K]*n, t), and the next step lowers frame j with chance k_j / sum(s).
    """

    name = "paths"

    def sample_cube(self, batch, generator=None):
        n, K = self.frames, self.cube_levels
        t = _randint(0, n * K, (batch,), generator)  # [B] steps already taken
        cube = K - hypergeometric(t, n, K, int(_randint(0, 2**62, (1,), generator)))  # [B, n]
        weights = cube.float() / cube.sum(dim=1, keepdim=True)
        return cube, weights

    def _counts(self, state, frame):
        done = [self.cube_levels - k for k in state]
        rest = list(state)
        rest[frame] -= 1
        return done, rest

    def _exact(self, state, frame):
        if state[frame] == 0:
            return Fraction(0)
        done, rest = self._counts(state, frame)
        total = multinomial([self.cube_levels] * self.frames) * self.decrements
        return Fraction(multinomial(done) * multinomial(rest), total)

    def _float(self, state, frame):
        if self.decrements <= EXACT_LIMIT or state[frame] == 0:
            return float(self._exact(state, frame))
        done, rest = self._counts(state, frame)
        log_p = log_multinomial(done) + log_multinomial(rest)
        log_p -= log_multinomial([self.cube_levels] * self.frames) + math.log(self.decrements)
        return math.exp(log_p)


class Teacher(Weighting):
    """Teacher forcing: the staircase edge of the cube, frames denoised one at a time in order."""

    name = "teacher"

    def sample_cube(self, batch, generator=None):
        n, K = self.frames, self.cube_levels
        active = _randint(0, n, (batch, 1), generator)  # [B, 1] frame being denoised
        k = _randint(1, K + 1, (batch, 1), generator)  # [B, 1] its level
        index = torch.arange(n, device=active.device)  # [n]
        cube = torch.where(index < active, 0, torch.where(index > active, K, k))  # [B, n]
        return cube, (index == active).float()

    def _exact(self, state, frame):
        K = self.cube_levels
        on_edge = (
            state[frame] >= 1
            and all(k == 0 for k in state[:frame])
            and all(k == K for k in state[frame + 1 :])
        )
        return Fraction(int(on_edge), self.decrements)


class Sync(Weighting):
    """Full-sequence diffusion: the diagonal, every frame at the same level."""

    name = "sync"

    def sample_cube(self, batch, generator=None):
        n, K = self.frames, self.cube_levels
        k = _randint(1, K + 1, (batch, 1), generator)  # [B, 1]
        return k.expand(batch, n).clone(), torch.full((batch, n), 1 / n, device=k.device)

    def _exact(self, state, frame):
        return Fraction(int(state[0] >= 1 and len(set(state)) == 1), self.decrements)


class Schedule(Weighting):
    """One scheduling matrix used as the training distribution: a row m ~ U{0..S-1}.

    Frame j is weighted by the levels it drops from row m to m+1 (1 in a unit-step matrix),
    so coarse matrices keep the normalisation of the others.
    """

    name = "schedule"

    def __init__(
        self,
        frames: int,
        levels: int,
        cube_levels: int | None = None,
        schedule: str | Sequence[Sequence[int]] | Tensor = "autoregressive",
        steps: int | None = None,
        **schedule_options,
    ) -> None:
        super().__init__(frames, levels, cube_levels)
        steps = self.cube_levels if steps is None else steps
        self.schedule = schedule if isinstance(schedule, str) else "custom"
        self.matrix = scheduling_matrix(schedule, frames, self.cube_levels, steps, **schedule_options)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, schedule={self.schedule}, rows={len(self.matrix)})"

    def sample_cube(self, batch, generator=None):
        matrix = self.matrix.to(_device(generator))
        rows = len(matrix) - 1
        m = _randint(0, rows, (batch,), generator)  # [B]
        drop = (matrix[m] - matrix[m + 1]).float()  # [B, n]
        return matrix[m], drop * (rows / self.decrements)

    def _exact(self, state, frame):
        hits = (self.matrix[:-1] == torch.tensor(state)).all(dim=1).nonzero()
        if len(hits) == 0:
            return Fraction(0)
        m = int(hits[0])
        return Fraction(int(self.matrix[m, frame] - self.matrix[m + 1, frame]), self.decrements)


class Mixture(Weighting):
    """A convex mix of weightings: each sample picks a component, then samples as it."""

    name = "mixture"

    def __init__(
        self,
        frames: int,
        levels: int,
        cube_levels: int | None = None,
        components: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(frames, levels, cube_levels)
        if not components:
            raise ValueError("mixture needs components, e.g. components={'paths': 0.5, 'teacher': 0.5}")
        if any(not p > 0 for p in components.values()):
            raise ValueError(f"mixture component probabilities must be positive, got {dict(components)}")
        total = sum(Fraction(p) for p in components.values())
        self.probs = [Fraction(p) / total for p in components.values()]
        self.components = [
            get_weighting(name, frames, levels, cube_levels=self.cube_levels) for name in components
        ]

    def __repr__(self) -> str:
        mix = ", ".join(f"{c.name}={float(p):.3g}" for c, p in zip(self.components, self.probs, strict=True))
        return f"Mixture({mix}, frames={self.frames}, levels={self.levels}, cube={self.cube_levels})"

    def sample_cube(self, batch, generator=None):
        device = _device(generator)
        probs = torch.tensor([float(p) for p in self.probs], device=device)
        pick = torch.multinomial(probs, batch, replacement=True, generator=generator)  # [B]
        cube = torch.empty(batch, self.frames, dtype=torch.long, device=device)
        weights = torch.empty(batch, self.frames, device=device)
        for i, component in enumerate(self.components):
            rows = (pick == i).nonzero().squeeze(1)
            cube[rows], weights[rows] = component.sample_cube(len(rows), generator)
        return cube, weights

    def _exact(self, state, frame):
        return sum(
            (p * c._exact(state, frame) for p, c in zip(self.probs, self.components, strict=True)),
            Fraction(0),
        )

    def _float(self, state, frame):
        return sum(
            float(p) * c._float(state, frame) for p, c in zip(self.probs, self.components, strict=True)
        )


class Blocked(Weighting):
    """A weighting over blocks of `block` frames: the frames of a block share a level, and the block, not the
    frame, is the unit of the cube (diffusion forcing with chunks; a model with `frames_per_block` > 1
    denoises a block at a time). `base` is the weighting over the n / block blocks.

    One step of a block lowers its `block` frames at once: `block` of the path's n*K frame decrements at the
    same state. So edge_probability(s, j) = base.edge_probability(S, J) / block for the block state S (s
    constant on every block, else 0) and j's block J, and each frame carries its block's weight / block.
    """

    def __init__(self, base: Weighting, block: int) -> None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        super().__init__(base.frames * block, base.levels, base.cube_levels)
        self.inner, self.block, self.name = base, block, base.name

    def __repr__(self) -> str:
        return f"Blocked({self.inner!r}, block={self.block})"

    @property
    def base(self) -> Weighting:
        return self.inner

    def sample_cube(self, batch, generator=None):
        cube, weights = self.inner.sample_cube(batch, generator)  # [B, n / block] each
        return cube.repeat_interleave(self.block, 1), weights.repeat_interleave(self.block, 1) / self.block

    def blocks(self, state: tuple[int, ...]) -> tuple[int, ...] | None:
        """The block state of a frame state, None where a block's frames differ."""
        blocks = [state[i : i + self.block] for i in range(0, self.frames, self.block)]
        return tuple(b[0] for b in blocks) if all(len(set(b)) == 1 for b in blocks) else None

    def _exact(self, state, frame):
        blocks = self.blocks(state)
        return Fraction(0) if blocks is None else self.inner._exact(blocks, frame // self.block) / self.block

    def _float(self, state, frame):
        blocks = self.blocks(state)
        return 0.0 if blocks is None else self.inner._float(blocks, frame // self.block) / self.block


WEIGHTINGS: dict[str, type[Weighting]] = {
    w.name: w for w in (Independent, Paths, Teacher, Sync, Schedule, Mixture)
}


def get_weighting(name: str, frames: int, levels: int, frames_per_block: int = 1, **options) -> Weighting:
    """Build a weighting by name; `schedule:NAME` is short for `schedule` with `schedule=NAME`.
    `frames_per_block` > 1: the weighting over the blocks of a model that denoises that many frames
    together (`Blocked`)."""
    if frames_per_block > 1:
        if frames % frames_per_block:
            raise ValueError(f"frames={frames} must be whole blocks of {frames_per_block}")
        base = get_weighting(name, frames // frames_per_block, levels, **options)
        return Blocked(base, frames_per_block)
    name, _, schedule = name.partition(":")
    if schedule:
        if name != "schedule":
            raise ValueError(f"only 'schedule:NAME' takes a ':' suffix, got '{name}:{schedule}'")
        options = {"schedule": schedule, **options}
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting '{name}'; choose from {', '.join(WEIGHTINGS)}")
    params = inspect.signature(WEIGHTINGS[name]).parameters
    takes = set(params) - {"frames", "levels", "schedule_options"}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()) and (unknown := set(options) - takes):
        raise ValueError(
            f"weighting '{name}' got unknown options {sorted(unknown)}; it takes {sorted(takes)}"
        )
    return WEIGHTINGS[name](frames, levels, **options)
