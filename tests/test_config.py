import pytest

from dforce.config import Config, ConfigError, load_config, model_kwargs

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
        path, ["trajectory.options={components: {paths: 0.5, teacher: 0.5}}"]
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
        (["train.mixed_precision=fp8"], r"train: mixed_precision must be"),
        (["noise.parameterization=score"], r"noise: unknown parameterization 'score'"),
        (["train=3"], r"train: expected a mapping"),
        (["seed"], r"override 'seed' is not key=value"),
        (["seed.x=1"], r"seed is not a section"),
    ],
)
def test_errors_name_the_key(path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path, overrides)
    assert "\n" not in str(error.value)


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
