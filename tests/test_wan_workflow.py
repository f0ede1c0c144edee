"""The "Fine-tuning Wan 2.1 / SkyReels-V2" workflow of docs/lora_wan.md, run as written on its toy
pipeline: the bash block that starts with `python tools/wan_toy_pipeline.py` is read from the page and each
of its commands run in this process (shell variables expanded and words split as bash does), with
configs/wan_df.yaml and configs/wan_self_forcing.yaml shrunk by the block's own dotted overrides. Nothing is
downloaded: the pipeline's transformer, VAE, text encoder and tokenizer are tiny random models of the real
classes."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import reset_accelerate
from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel

from dforce.cli import main
from dforce.models.lora import LORA_FILE
from dforce.models.wan import CausalWan
from dforce.training.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
TOOL = "tools/wan_toy_pipeline.py"


def toy_block() -> str:
    """The toy block of docs/lora_wan.md: the bash block of the Wan section that runs the toy pipeline."""
    section = (
        ROOT.joinpath("docs/lora_wan.md").read_text().split("## Fine-tuning Wan 2.1 / SkyReels-V2", 1)[1]
    )
    blocks = re.findall(r"```bash\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    (block,) = [b for b in blocks if b.startswith(f"python {TOOL}")]
    return block


def commands(block: str) -> list[str]:
    """Shell commands: continuation lines joined, a quoted value across lines kept whole, comments cut."""
    out, current = [], ""
    for line in block.splitlines():
        current += line.removesuffix("\\") + "\n"
        if line.endswith("\\"):
            continue
        try:
            shlex.split(current, comments=True)
        except ValueError:  # an open quote: the value goes on
            continue
        if current.strip():
            out.append(current)
        current = ""
    assert not current.strip(), f"unfinished command: {current}"
    return out


def run(block: str) -> None:
    """Each command as bash runs it: NAME=VALUE sets a variable, $NAME is replaced and split into words;
    `dforce ...` runs dforce's CLI, `python tools/wan_toy_pipeline.py ...` the tool."""
    spec = importlib.util.spec_from_file_location("wan_toy_pipeline", ROOT / TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    variables: dict[str, str] = {}
    for command in commands(block):
        if match := re.fullmatch(r"([A-Z_]+)=(.*)", command.strip(), flags=re.S):
            (variables[match[1]],) = shlex.split(match[2], comments=True)
            continue
        expanded = re.sub(r"\$([A-Z_]+)", lambda m: variables[m[1]], command)
        argv = shlex.split(expanded, comments=True)
        if argv[0] == "dforce":
            main(argv[1:])
            reset_accelerate()
        elif argv[:2] == ["python", TOOL]:
            tool.main(argv[2:])
        else:
            raise AssertionError(f"the toy block runs dforce and {TOOL} only, not: {argv}")


@pytest.mark.parametrize("transformer", ["wan", "skyreels"])
def test_the_readme_toy_workflow_runs_as_written(tmp_path, monkeypatch, transformer):
    """make-shards with captions, encode-latents, encode-text (the captions, and a negative prompt),
    diffusion forcing (with LoRA), self-forcing straight from the pipeline folder (its bidirectional
    transformer the teacher and critic) and from the diffusion-forcing model (with LoRA), sample --prompt
    from all three, export --merge-lora: every command of the toy block of docs/lora_wan.md, on a toy Wan
    2.1 pipeline and on one with SkyReels-V2's transformer."""
    block = toy_block()
    if transformer == "skyreels":
        block = block.replace(
            f"python {TOOL} outputs/wan_toy", f"python {TOOL} outputs/wan_toy --transformer skyreels"
        )
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    run(block)

    out = tmp_path / "outputs/wan_toy"
    classes = {"wan": WanTransformer3DModel, "skyreels": SkyReelsV2Transformer3DModel}
    teacher, _ = load_model(out / "df/model")
    assert isinstance(teacher, CausalWan) and type(teacher.transformer) is classes[transformer]
    assert (teacher.horizon, teacher.frames_per_block, teacher.text_dim) == (6, 3, 32)
    assert (out / "df/model" / LORA_FILE).is_file()  # train.lora.rank=4: the adapters beside the base
    assert json.loads((out / "df/model/vae.json").read_text())["vae_class"] == "AutoencoderKLWan"
    generator, noise = load_model(out / "sf/model")
    assert isinstance(generator, CausalWan) and noise.parameterization == "flow"
    assert (out / "sf/model" / LORA_FILE).is_file()  # train.lora.rank=4: the generator's adapters
    from_wan, _ = load_model(out / "sf_wan/model")  # from the pipeline: causal in blocks of 3, all trained
    assert (from_wan.horizon, from_wan.frames_per_block) == (6, 3) and not (
        out / "sf_wan/model" / LORA_FILE
    ).exists()
    assert json.loads((out / "sf_wan/model/sampling.json").read_text())["steps"] == [1000, 750, 500, 250]
    merged, _ = load_model(out / "merged")
    assert not (out / "merged" / LORA_FILE).exists() and isinstance(merged, CausalWan)
    for video in "sample.mp4", "sample_wan.mp4", "teacher.mp4":
        assert (out / video).stat().st_size > 0
