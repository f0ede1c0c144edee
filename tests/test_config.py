import subprocess
import sys
from pathlib import Path

import pytest

from dforce.training.config import Config, ConfigError, load_config, model_kwargs

BASE = """\
output_dir: out
seed: 3
train: {max_steps: 10, checkpoint_every: 5, batch_size: 2, lr: 1e-4}
data: {shards: "a-{000000..000003}.tar", clip_frames: 8}
model: {num_layers: 2}
"""


@pytest.fixture
def path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(BASE)
    return path


def test_loads_tree_with_overrides(path):
    config = load_config(
        path, ["train.max_steps=200", "model.attention_head_dim=16", "trajectory.name=teacher"]
    )
    assert isinstance(config, Config)
    assert (config.seed, config.train.max_steps, config.train.lr) == (3, 200, 1e-4)  # 1e-4 is a YAML string
    assert config.trajectory.name == "teacher"
    assert model_kwargs(config) == {"num_frames": 8, "num_layers": 2, "attention_head_dim": 16}
    assert load_config(path, ["train.betas=[0.8, 0.9]"]).train.betas == (0.8, 0.9)
    assert load_config(path, ["validation.shards=null"]).validation.shards is None
    assert load_config(
        path, ["trajectory.name=mixture", "trajectory.options={components: {paths: 0.5, teacher: 0.5}}"]
    ).trajectory.options


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_step=3"], r"run\.yaml: train\.max_step: unknown key; valid keys: max_steps"),
        (["colour=red"], r"colour: unknown key"),
        (["model.bogus=1"], r"model\.bogus: unknown key; valid keys: in_channels"),
        (["train.lr=fast"], r"train\.lr: expected float, got 'fast'"),
        (["model.num_layers=2.5"], r"model\.num_layers: expected int, got 2\.5"),
        (["train.batch_size=true"], r"train\.batch_size: expected int, got True"),
        (["train.betas=[0.9]"], r"train\.betas: expected 2 values"),
        (["train.mixed_precision=fp8"], r"train\.mixed_precision: must be one of no, bf16"),
        (["noise.parameterization=score"], r"noise\.parameterization: unknown parameterization 'score'"),
        (["train=3"], r"train: expected a mapping"),
        (
            ["train.mixed_precision=no"],
            r"got False \(YAML reads an unquoted no, yes, on, off as a bool: quote it\)",
        ),
        (["noise.schedule=foo"], r"noise\.schedule: unknown noise schedule 'foo'; valid: cosine, linear"),
        (["noise.schedule_options={shift: 3}"], r"noise\.schedule: unknown option\(s\) \['shift'\]"),
        (
            ["trajectory.name=foo"],
            r"trajectory\.name: unknown weighting 'foo'; choose from independent, paths",
        ),
        (
            ["trajectory.options={block: 2}"],
            r"trajectory\.name: weighting 'paths' got unknown options \['block'\]",
        ),
        (["trajectory.cube_levels=5000"], r"trajectory\.name: cube_levels must be in 1\.\.levels=1000"),
        (["loss.level_weight=foo"], r"loss\.level_weight: unknown loss weighting 'foo'; valid: simple, elbo"),
        (
            ["loss.level_weight=min_snr", "loss.level_weight_options={gama: 5}"],
            r"loss\.level_weight: unknown option\(s\) \['gama'\] for loss weighting 'min_snr'",
        ),
        (
            ["train.lr_scheduler=foo"],
            r"train\.lr_scheduler: unknown lr scheduler 'foo'; valid: linear, cosine",
        ),
        (["validation.weightings=[paths, foo]"], r"validation\.weightings\[1\]: unknown weighting 'foo'"),
        (
            ["validation.scheduling=foo"],
            r"validation\.scheduling: unknown schedule 'foo'; choose from autoregr",
        ),
        (["validation.history_guidance=0.5"], r"validation\.history_guidance: must be >= 1 \(1: none\)"),
        (["validation.history_guidance=2"], r"validation\.history_guidance: needs loss\.drop_history > 0"),
        (["validation.sampling_steps=5000"], r"validation\.scheduling: steps must be in 1\.\.levels=1000"),
        (
            ["train.trackers=[tensorboard, foo]"],
            r"train\.trackers\[1\]: unknown tracker 'foo'; valid: aim, comet",
        ),
        (["train.keep_checkpoints=-1"], r"train\.keep_checkpoints: must be >= 0 \(0 keeps all\)"),
        (["objective=foo"], r"objective: must be denoising or self_forcing, got 'foo'"),
        (["objective=self_forcing"], r"self_forcing: objective self_forcing needs this section"),
        (
            ["objective=self_forcing", "self_forcing={teacher: t, init: foo}"],
            r"self_forcing\.init: must be teacher",
        ),
        (
            ["objective=self_forcing", "self_forcing={teacher: t, weighting: foo}"],
            r"self_forcing\.weighting: unknown weighting 'foo'",
        ),
        (["seed"], r"override 'seed' is not key=value"),
        (["seed.x=1"], r"seed is not a section"),
    ],
)
def test_errors_name_the_key(path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, overrides)
    assert "\n" not in str(error.value)


def test_uninstalled_tracker_is_an_error(path):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    installed = {getattr(kind, "value", kind) for kind in get_available_trackers()}
    missing = next((name for name in LOGGER_TYPE_TO_CLASS if name not in installed), None)
    if missing is None:
        pytest.skip("every Accelerate tracker is installed here")
    with pytest.raises(
        ConfigError, match=rf"train\.trackers\[0\]: tracker '{missing}' is not installed here"
    ):
        load_config(path, [f"train.trackers=[{missing}]"])


def test_bad_names_fail_fast_from_the_command_line(path):
    """The command, not just `load_config`: the error comes before any model or data is made."""
    command = [sys.executable, "-m", "dforce", "train", str(path), "trajectory.name=foo"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.strip() == (
        f"dforce train: {path}: trajectory.name: unknown weighting 'foo'; choose from independent, paths, "
        "teacher, sync, schedule, mixture"
    )
    assert not (path.parent / "out").exists()


def test_missing_keys_and_files(tmp_path, path):
    path.write_text(BASE.replace("seed: 3\n", ""))
    with pytest.raises(ConfigError, match=r"missing required key.*: seed"):
        load_config(path)
    path.write_text(BASE.replace("batch_size: 2, ", ""))
    with pytest.raises(ConfigError, match=r"missing required key.*train\.batch_size"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML"):
        load_config(path)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml"))
)
def test_shipped_configs_load(name):
    path = Path(__file__).parents[1] / "configs" / name
    if name == "wan_df.yaml":  # its folder comes from the command line; without it nothing is built at random
        with pytest.raises(ConfigError, match=r"model\.pretrained: give the diffusers folder"):
            load_config(path)
        load_config(path, ["model.config={}"])  # an explicit random model of diffusers' default shape
        return
    if name == "wan_self_forcing.yaml":  # its teacher, the folder downloaded, comes from the command line
        with pytest.raises(ConfigError, match=r"missing required key\(s\): self_forcing\.teacher"):
            load_config(path)
        load_config(path, ["self_forcing.teacher=WAN"])
        return
    load_config(path)
