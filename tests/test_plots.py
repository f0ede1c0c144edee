"""Weight pictures: the numbers drawn are the exact ones, and the CLI writes a PNG or a named error."""

import pytest
import torch

from dforce.cli import main
from dforce.diffusion.trajectory import get_weighting
from dforce.evaluation.plots import edge_mass_grid, level_marginals


def test_two_frame_grid_is_the_exact_edge_mass():
    weighting = get_weighting("paths", 2, 5)
    grid = edge_mass_grid(weighting)
    assert grid.sum().item() == pytest.approx(1)
    assert grid[5, 5].item() == pytest.approx(1 / 10)  # every path leaves (K, K): 2 edges of 1/(nK) each
    assert torch.allclose(grid, grid.T)  # uniform paths are symmetric in the frames


def test_level_marginals_show_the_teacher_staircase():
    """Teacher forcing visits states whose earlier frames are clean and later frames pure noise."""
    marginals = level_marginals(get_weighting("teacher", 4, 8), samples=20_000, bins=9)
    torch.testing.assert_close(marginals.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert marginals[0, 0] == pytest.approx(3 / 4, abs=0.02)  # clean during the 3 other frames' turns
    assert marginals[-1, -1] == pytest.approx(3 / 4 + 1 / 32, abs=0.02)  # noise until its own turn
    assert marginals[-1, 0] == 0 and marginals[0, -1] == pytest.approx(1 / 32, abs=0.01)


@pytest.mark.parametrize("frames", [2, 4])
def test_cli_writes_png(tmp_path, frames, capsys):
    out = tmp_path / "w.png"
    main(["plot-weights", "--frames", str(frames), "--levels", "6", "--samples", "2000", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


def test_cli_names_the_bad_weighting(tmp_path):
    with pytest.raises(SystemExit, match="unknown weighting 'bogus'"):
        main(["plot-weights", "--weightings", "paths,bogus", "--out", str(tmp_path / "w.png")])
