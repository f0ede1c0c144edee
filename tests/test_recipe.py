"""A model's sampling recipe (`sampling.json`): saved and read back, written by training from the
validation settings, and used by `dforce sample` and `dforce eval` unless a flag says otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CONFIG, reset_accelerate

from dforce.cli import main
from dforce.data.synthetic import write_bouncing_balls
from dforce.diffusion.noise import NoiseConfig
from dforce.diffusion.recipe import SAMPLE_DEFAULTS, SamplingRecipe, resolve
from dforce.models.model import CausalVideoTransformer
from dforce.training.config import load_config
from dforce.training.train import train

GUIDED = SamplingRecipe(steps=3, history_guidance=1.5, context_noise=4, sampler="ddim", eta=0.5)
FLAGS = ["--steps", "3", "--history-guidance", "1.5", "--context-noise", "4", "--eta", "0.5"]  # the same


def test_recipe_round_trips_and_reads_none_where_there_is_none(tmp_path):
    recipe = SamplingRecipe(
        sampler="ddim", eta=0.3, steps=4, shift=2.0, scheduling="pyramid", block=2, offset=1, chunk=4,
        guidance=1.5, history_guidance=1.25, text_guidance=3.0, context_noise=20, sink=2,
    )  # fmt: skip
    path = recipe.save(tmp_path)
    assert path.name == "sampling.json" and SamplingRecipe.load(tmp_path) == recipe
    assert json.loads(path.read_text())["history_guidance"] == 1.25  # plain JSON, a key per setting
    assert SamplingRecipe.load(tmp_path / "nowhere") is None  # a model written before recipes
    path.write_text('{"steps": 0}')
    with pytest.raises(ValueError, match=r"sampling\.json: steps: must be >= 1"):
        SamplingRecipe.load(tmp_path)
    path.write_text('{"stepz": 4}')
    with pytest.raises(ValueError, match=r"sampling\.json: .*stepz"):
        SamplingRecipe.load(tmp_path)
    with pytest.raises(ValueError, match="sampler: eta is a ddim option"):
        SamplingRecipe(sampler="ddpm", eta=0.5)


def test_flags_override_the_recipe_and_the_line_says_whence(tmp_path):
    recipe = SamplingRecipe(steps=4, shift=2.0, scheduling="pyramid", offset=2, chunk=4, eta=0.5, sink=1)
    assert recipe.override(steps=None) == recipe  # None: not given
    assert recipe.override(steps=6).steps == 6 and recipe.override(steps=6).offset == 2
    # Another schedule keeps the step grid but not the recipe's own schedule's options
    other = recipe.override(scheduling="autoregressive")
    assert (other.steps, other.shift, other.offset, other.chunk, other.sink) == (4, 2.0, None, None, 1)
    assert recipe.override(scheduling="matrix.json").shift is None  # a custom matrix takes no options
    assert recipe.override(sampler="ddpm").eta == 0.0  # eta is ddim's
    with pytest.raises(TypeError, match="unknown sampling settings"):
        recipe.override(stepz=3)

    recipe.save(tmp_path)
    used, line = resolve(tmp_path, {"steps": 6, "history_guidance": 1.25, "sink": None})
    assert used == SamplingRecipe(
        steps=6, shift=2.0, scheduling="pyramid", offset=2, chunk=4, eta=0.5, sink=1, history_guidance=1.25
    )
    assert line == (
        "sampling: ddim eta 0.5, 6 steps, shift 2, pyramid offset 2 chunk 4, history guidance 1.25, sink 1 "
        "(from the model's sampling.json; --steps, --history-guidance given)"
    )
    used, line = resolve(tmp_path / "old", {"scheduling": "sync"})
    assert used == SamplingRecipe(scheduling="sync")
    whence = f"defaults: no sampling.json in {tmp_path / 'old'}; --schedule given"
    assert line == f"sampling: ddim, 10 steps, sync ({whence})"


# ------------------------------------------------------------------------------- written by training


def test_a_trained_model_records_its_validation_settings(tmp_path, data, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", data=data))
    overrides = [
        "train.max_steps=2", "train.checkpoint_every=2", "loss.drop_history=0.2",
        f"validation.shards={data}/val-*.tar", "validation.every=2", "validation.batches=1",
        "validation.weightings=[teacher]", "validation.rollout_clips=0", "validation.context_frames=2",
        "validation.sampling_steps=3", "validation.history_guidance=1.5", "validation.context_noise=4",
        "validation.scheduling=pyramid",
    ]  # fmt: skip
    config = load_config(path, overrides)
    model = train(config)
    expected = SamplingRecipe(steps=3, scheduling="pyramid", history_guidance=1.5, context_noise=4)
    assert config.sampling_recipe() == expected and SamplingRecipe.load(model) == expected
    main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exported")])
    assert SamplingRecipe.load(tmp_path / "exported") == expected  # `dforce export` carries it over

    # A run that finished before models carried a recipe gets it when the same run is resumed
    (model / SamplingRecipe.FILE).unlink()
    reset_accelerate()
    train(load_config(path, overrides))
    assert SamplingRecipe.load(model) == expected
    capsys.readouterr()

    main(["sample", "--model", str(model), "--frames", "2"])
    printed = capsys.readouterr().out
    assert (
        "sampling: ddim, 3 steps, pyramid, history guidance 1.5, context noise 4 (from the model's" in printed
    )
    assert (tmp_path / "run/samples/sample_seed0.mp4").is_file()  # the default --out, beside the model
    assert f"wrote {tmp_path / 'run/samples/sample_seed0.mp4'}" in printed


# ------------------------------------------------------------------------------ used by sample and eval


def save_model(directory: Path, recipe: SamplingRecipe | None = None) -> str:
    """A tiny random model (every weight random, so that guidance and steps change its samples) saved as
    training saves one, with `recipe` as its sampling.json, or none (a model from before recipes)."""
    model = CausalVideoTransformer(
        sample_size=16, patch_size=4, num_frames=4, num_layers=1, num_attention_heads=2, attention_head_dim=8
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(directory)
    NoiseConfig(levels=50).save(directory)
    if recipe is not None:
        recipe.save(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """The same model twice: with the GUIDED recipe, and without a recipe."""
    root = tmp_path_factory.mktemp("recipe_models")
    return save_model(root / "guided", GUIDED), save_model(root / "old")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("recipe_balls")
    write_bouncing_balls(out, num_clips=2, frames=6, size=16, num_balls=1, seed=3, prefix="val")
    return str(out / "val-*.tar")


def sample(model: str, out: Path, *flags: str) -> bytes:
    main(["sample", "--model", model, "--frames", "4", "--seed", "1", "--out", str(out), *flags])
    return out.read_bytes()


def test_sample_uses_the_recipe_unless_a_flag_says_otherwise(models, tmp_path, capsys):
    guided, old = models
    from_recipe = sample(guided, tmp_path / "a.mp4")
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (
        "sampling: ddim eta 0.5, 3 steps, autoregressive, history guidance 1.5, context noise 4 "
        "(from the model's sampling.json)"
    )
    assert from_recipe == sample(old, tmp_path / "b.mp4", *FLAGS)  # the same settings, given as flags
    assert from_recipe != sample(old, tmp_path / "c.mp4")  # the defaults are not the recipe
    # An explicit flag wins over the recipe; the rest of the recipe stays
    capsys.readouterr()
    overridden = sample(guided, tmp_path / "d.mp4", "--steps", "2", "--history-guidance", "1")
    assert capsys.readouterr().out.splitlines()[0] == (
        "sampling: ddim eta 0.5, 2 steps, autoregressive, context noise 4 "
        "(from the model's sampling.json; --steps, --history-guidance given)"
    )
    flags = ["--steps", "2", "--history-guidance", "1", "--context-noise", "4", "--eta", "0.5"]
    assert overridden == sample(old, tmp_path / "e.mp4", *flags) != from_recipe


def test_a_model_without_a_recipe_samples_with_the_defaults(models, tmp_path, capsys):
    """A model folder written before recipes samples as `dforce sample` always did: 50 steps."""
    _, old = models
    video = sample(old, tmp_path / "a.mp4")
    assert capsys.readouterr().out.splitlines()[0] == (
        f"sampling: ddim, 50 steps, autoregressive (the command's defaults: no sampling.json in {old})"
    )
    assert SamplingRecipe(steps=50) == SAMPLE_DEFAULTS
    flags = ["--steps", "50", "--schedule", "autoregressive", "--sampler", "ddim"]
    assert video == sample(old, tmp_path / "b.mp4", *flags)


def test_eval_uses_the_recipe_unless_a_flag_says_otherwise(models, shards, tmp_path, capsys):
    guided, old = models
    args = ["--data", shards, "--clips", "2", "--context-frames", "2", "--frames", "4", "--elbo-draws", "0"]

    def evaluate(model: str, out: str, *flags: str) -> dict:
        main(["eval", "--model", model, *args, "--out", str(tmp_path / out), *flags])
        return json.loads((tmp_path / out / "metrics.json").read_text())

    def scores(result: dict) -> str:  # as written: nan (no ball found) equals nan
        return json.dumps(result["summary"], sort_keys=True)

    from_recipe = evaluate(guided, "a")
    assert "sampling: ddim eta 0.5, 3 steps, autoregressive, history guidance 1.5, context noise 4 (from" in (
        capsys.readouterr().out
    )
    settings = from_recipe["settings"]
    assert (settings["steps"], settings["history_guidance"], settings["context_noise"]) == (3, 1.5, 4)
    flagged = evaluate(old, "b", *FLAGS)
    assert flagged["settings"] == settings and scores(flagged) == scores(from_recipe)
    assert scores(evaluate(old, "c")) != scores(from_recipe)  # the defaults score otherwise
    overridden = evaluate(guided, "d", "--history-guidance", "1")
    assert "(from the model's sampling.json; --history-guidance given)" in capsys.readouterr().out
    assert overridden["settings"] == {**settings, "history_guidance": 1.0}
    flags = ["--steps", "3", "--context-noise", "4", "--eta", "0.5"]
    assert scores(overridden) == scores(evaluate(old, "e", *flags)) != scores(from_recipe)


def test_bad_recipe_is_one_line(models, tmp_path):
    guided, _ = models
    broken = Path(shutil.copytree(guided, tmp_path / "broken"))
    (broken / SamplingRecipe.FILE).write_text('{"sampler": "spiral"}')
    with pytest.raises(SystemExit, match=r"sampling\.json: sampler: unknown sampler 'spiral'"):
        main(["sample", "--model", str(broken), "--frames", "2", "--out", str(tmp_path / "v.mp4")])
    with pytest.raises(SystemExit, match="sampler: eta is a ddim option"):  # --sampler given, --eta too
        main(["sample", "--model", guided, "--frames", "2", "--sampler", "ddpm", "--eta", "0.5"])
