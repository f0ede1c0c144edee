"""Trajectory weightings: closed forms against brute-force enumeration, samplers against closed forms."""

import itertools
import math
from collections import Counter
from fractions import Fraction

import pytest
import torch

from dforce.diffusion.trajectory import get_weighting, scheduling_matrix

SMALL = [(n, K) for n in (1, 2, 3) for K in (1, 2, 3)]
NAMES = ["independent", "paths", "teacher", "sync", "schedule:pyramid", "schedule:autoregressive"]


def unit_paths(remaining: list[int]):
    """Every monotone unit-step path from `remaining` to 0, as the sequence of frames lowered."""
    if not any(remaining):
        yield ()
        return
    for j, k in enumerate(remaining):
        if k:
            remaining[j] -= 1
            for rest in unit_paths(remaining):
                yield (j, *rest)
            remaining[j] += 1


def edges_of(path: tuple[int, ...], n: int, K: int):
    state = [K] * n
    for j in path:
        yield tuple(state), j
        state[j] -= 1


def brute_force(name: str, n: int, K: int) -> Counter:
    """Exact edge fractions from first principles: enumerate the paths (or edges) of the weighting."""
    counts: Counter = Counter()
    if name == "paths":
        paths = list(unit_paths([K] * n))
        for path in paths:
            for edge in edges_of(path, n, K):
                counts[edge] += Fraction(1, len(paths) * n * K)
    elif name == "independent":
        edges = [(s, j) for s in itertools.product(range(K + 1), repeat=n) for j in range(n) if s[j]]
        counts.update({edge: Fraction(1, len(edges)) for edge in edges})
    elif name == "teacher":  # the staircase: frame 0 all the way down, then frame 1, ...
        staircase = tuple(j for j in range(n) for _ in range(K))
        counts.update({edge: Fraction(1, n * K) for edge in edges_of(staircase, n, K)})
    elif name == "sync":  # the diagonal: every frame lowered once per row
        counts.update({((k,) * n, j): Fraction(1, n * K) for k in range(1, K + 1) for j in range(n)})
    elif name.startswith("schedule"):  # unit steps: one frame per row, so each row change is an edge
        matrix = scheduling_matrix(name.split(":")[1], n, K, K).tolist()
        for row, nxt in itertools.pairwise(matrix):
            for j in range(n):
                counts[(tuple(row), j)] += Fraction(row[j] - nxt[j], n * K)
    return counts


def exact_table(weighting) -> dict:
    n, K = weighting.frames, weighting.cube_levels
    states = itertools.product(range(K + 1), repeat=n)
    return {(s, j): weighting.edge_probability(s, j, exact=True) for s in states for j in range(n)}


@pytest.mark.parametrize("n,K", SMALL)
@pytest.mark.parametrize("name", NAMES)
def test_closed_form_equals_brute_force(name, n, K):
    weighting = get_weighting(name, n, K)
    table = exact_table(weighting)
    expected = brute_force(name, n, K)
    assert table == {edge: expected.get(edge, Fraction(0)) for edge in table}
    assert sum(table.values()) == 1


def blocked_brute_force(name: str, blocks: int, K: int, block: int) -> Counter:
    """Edge fractions on the frame cube of a weighting over blocks, from the block paths: each step of a
    block lowers its `block` frames together, `block` of the path's n*K frame decrements at one state."""
    counts: Counter = Counter()
    for (state, lowered), p in brute_force(name, blocks, K).items():
        frames = tuple(k for k in state for _ in range(block))
        for j in range(lowered * block, (lowered + 1) * block):
            counts[(frames, j)] += p * Fraction(blocks * K, blocks * block * K)
    return counts


@pytest.mark.parametrize("blocks,block,K", [(1, 2, 2), (2, 2, 1), (2, 2, 2), (3, 2, 1), (2, 3, 1), (1, 3, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_block_weightings_equal_brute_force(name, blocks, block, K):
    """Blocks are the unit of the cube: frames of a block share a level, every edge lowers a whole block."""
    weighting = get_weighting(name, blocks * block, K, frames_per_block=block)
    assert weighting.block == block and weighting.base.frames == blocks
    table = exact_table(weighting)
    expected = blocked_brute_force(name, blocks, K, block)
    assert table == {edge: expected.get(edge, Fraction(0)) for edge in table}
    assert sum(table.values()) == 1
    levels, weights = weighting.sample(500, torch.Generator().manual_seed(0))
    by_block = levels.view(500, blocks, block)
    assert (by_block == by_block[:, :, :1]).all()  # one level per block
    assert torch.equal(
        weights.view(500, blocks, block), weights.view(500, blocks, block)[:, :, :1].expand(-1, -1, block)
    )


def test_one_frame_blocks_are_the_frame_weighting():
    frames = get_weighting("paths", 3, 4, frames_per_block=1)
    assert type(frames).__name__ == "Paths" and frames.block == 1 and frames.base is frames
    assert get_weighting("teacher", 4, 3, frames_per_block=2).base.name == "teacher"
    with pytest.raises(ValueError, match="whole blocks of 2"):
        get_weighting("paths", 3, 4, frames_per_block=2)


@pytest.mark.parametrize("n,K", SMALL)
def test_mixture_is_the_convex_combination(n, K):
    mix = get_weighting("mixture", n, K, components={"paths": 3, "teacher": 1})
    paths, teacher = brute_force("paths", n, K), brute_force("teacher", n, K)
    for edge, p in exact_table(mix).items():
        assert p == Fraction(3, 4) * paths.get(edge, 0) + Fraction(1, 4) * teacher.get(edge, 0)


@pytest.mark.parametrize("n,K", SMALL)
def test_named_schedules_as_weightings_match_their_special_cases(n, K):
    """teacher == the autoregressive matrix at unit steps, sync == the sync matrix at unit steps."""
    assert exact_table(get_weighting("schedule:teacher", n, K)) == exact_table(get_weighting("teacher", n, K))
    assert exact_table(get_weighting("schedule:sync", n, K)) == exact_table(get_weighting("sync", n, K))


def empirical_table(weighting, samples: int, seed: int = 0) -> torch.Tensor:
    """Monte-Carlo E[weights[:, j] * 1[cube state == s]]: [(K+1)^n, n]."""
    n, K = weighting.frames, weighting.cube_levels
    levels, weights = weighting.sample(samples, torch.Generator().manual_seed(seed))
    cube = weighting.to_cube(levels)
    index = (cube * (K + 1) ** torch.arange(n)).sum(dim=1)  # [N] state number, frame 0 least significant
    table = torch.zeros((K + 1) ** n, n, dtype=torch.float64)
    table.index_add_(0, index, weights.double())
    return table / samples


def closed_form_table(weighting) -> torch.Tensor:
    n, K = weighting.frames, weighting.cube_levels
    states = [s[::-1] for s in itertools.product(range(K + 1), repeat=n)]  # same numbering as above
    return torch.tensor([[weighting.edge_probability(s, j) for j in range(n)] for s in states])


MC_CASES = [
    ("independent", {}),
    ("paths", {}),
    ("teacher", {}),
    ("sync", {}),
    ("schedule:pyramid", {"offset": 2}),
    ("mixture", {"components": {"paths": 0.7, "schedule:autoregressive": 0.3}}),
    ("paths", {"cube_levels": 3}),  # coarse cube over 12 diffusion levels
    ("paths", {"frames_per_block": 2}),  # 2 blocks of 2 frames
    ("independent", {"frames_per_block": 2}),
]


@pytest.mark.parametrize("name,options", MC_CASES)
def test_sampled_weights_match_edge_probabilities(name, options):
    """The defining property: E[w_j 1[s]] = edge_probability(s, j), checked in total variation."""
    levels = 12 if "cube_levels" in options else 3
    weighting = get_weighting(name, 4 if "frames_per_block" in options else 3, levels, **options)
    exact = closed_form_table(weighting)
    tv = 0.5 * (empirical_table(weighting, 200_000) - exact).abs().sum()
    assert tv < 0.02, f"{weighting}: total variation {tv:.4f}"
    # The check discriminates: any other weighting is far away.
    block = options.get("frames_per_block", 1)
    other = get_weighting("paths" if name != "paths" else "independent", weighting.frames, 3, block)
    if "cube_levels" not in options:
        assert 0.5 * (closed_form_table(other) - exact).abs().sum() > 0.1


def test_weights_are_reproducible_from_the_generator():
    weighting = get_weighting("mixture", 4, 100, components={"paths": 1, "teacher": 1, "sync": 1})
    a = weighting.sample(64, torch.Generator().manual_seed(7))
    b = weighting.sample(64, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].dtype == torch.long and a[1].dtype == torch.float32 and a[0].shape == (64, 4)


def test_coarse_cube_bins_partition_the_levels_and_keep_ties():
    weighting = get_weighting("sync", 4, 10, cube_levels=3)
    cube = torch.arange(4).repeat(2000, 1)  # [N, 4] bins 0..3
    levels = weighting.to_levels(cube, torch.Generator().manual_seed(0))
    assert torch.equal(weighting.to_cube(levels), cube)
    assert torch.equal(weighting.to_cube(torch.arange(11)), torch.tensor([0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]))
    for c, bin_levels in zip(range(4), [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9, 10]], strict=True):
        counts = torch.bincount(levels[:, c], minlength=11)[bin_levels].double()
        assert counts.sum() == 2000 and (counts / 2000 - 1 / len(bin_levels)).abs().max() < 0.04
    # Synchronous frames stay synchronous after the jitter.
    levels, _ = weighting.sample(500, torch.Generator().manual_seed(1))
    assert (levels == levels[:, :1]).all()


def test_large_cube_stays_exact_and_normalised():
    """frames=16, levels=1000: lgamma agrees with big-integer arithmetic and with the hypergeometric law."""
    n, K = 16, 1000
    weighting = get_weighting("paths", n, K)
    levels, weights = weighting.sample(32, torch.Generator().manual_seed(0))
    assert levels.min() >= 0 and levels.max() <= K
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(32))
    for state in levels[:4].tolist():
        probs = [weighting.edge_probability(state, j) for j in range(n)]
        exact = [float(weighting.edge_probability(state, j, exact=True)) for j in range(n)]
        assert probs == pytest.approx(exact, rel=1e-8)
        t = n * K - sum(state)  # P(path visits state) / (nK) = hypergeometric pmf / (nK)
        pmf = Fraction(math.prod(math.comb(K, K - k) for k in state), math.comb(n * K, t))
        assert sum(probs) == pytest.approx(float(pmf) / (n * K), rel=1e-8)


def test_lgamma_path_is_normalised():
    n, K = 2, 200
    weighting = get_weighting("paths", n, K)
    total = math.fsum(
        weighting.edge_probability((a, b), j) for a in range(K + 1) for b in range(K + 1) for j in range(n)
    )
    assert total == pytest.approx(1, abs=1e-9)


def test_uniform_paths_collapse_to_the_diagonal_without_a_coarse_cube():
    """Why `cube_levels` exists: at K=1000 the frames of a uniform path barely differ."""
    fine = get_weighting("paths", 8, 1000)
    coarse = get_weighting("paths", 8, 1000, cube_levels=8)

    def spread(w):
        levels, _ = w.sample(2000, torch.Generator().manual_seed(0))
        return (levels.double().std(dim=1) / 1000).mean()

    assert spread(fine) < 0.03 < 0.1 < spread(coarse)


def test_custom_matrix_is_accepted_and_trains_as_a_schedule():
    matrix = [[3, 3], [1, 3], [0, 2], [0, 0]]
    assert scheduling_matrix(matrix, 2, 3, 1).tolist() == matrix
    weighting = get_weighting("schedule", 2, 3, schedule=matrix)
    assert weighting.edge_probability((3, 3), 0, exact=True) == Fraction(2, 6)
    assert weighting.edge_probability((0, 2), 1, exact=True) == Fraction(2, 6)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: get_weighting("nope", 2, 3), "unknown weighting 'nope'"),
        (lambda: get_weighting("paths", 2, 3, colour=1), "colour"),
        (lambda: get_weighting("paths", 2, 3, cube_levels=4), "cube_levels"),
        (lambda: get_weighting("paths:x", 2, 3), "only 'schedule:NAME'"),
        (lambda: get_weighting("schedule:spiral", 2, 3), "unknown schedule 'spiral'"),
        (lambda: get_weighting("mixture", 2, 3), "needs components"),
        (lambda: get_weighting("mixture", 2, 3, components={"paths": -1}), "positive"),
        (lambda: get_weighting("paths", 2, 3).edge_probability((1, 4), 0), "state"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
