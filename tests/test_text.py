"""Text conditioning end to end, on a tiny random UMT5 encoder and a word-level tokenizer made here
(nothing is downloaded): prompts to embeddings, encode-text shards, training with dropped text, the error
a model that reads text gives on shards without it, self-forcing with the clips' text, and
`dforce sample --prompt`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pattern, reset_accelerate
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from dforce.cli import main
from dforce.data.clips import DataConfig
from dforce.data.encode_text import encode_text
from dforce.data.loader import make_loader
from dforce.data.reading import read_samples
from dforce.data.shards import ShardSink, encode_video
from dforce.data.text import Text, TextEncoder, TextEncoderNotFound, encoder_folders
from dforce.diffusion.noise import NoiseConfig
from dforce.models.model import CausalVideoTransformer
from dforce.training.checkpoint import load_model
from dforce.training.config import ConfigError, load_config
from dforce.training.objectives.dmd import Plan, SelfForcing
from dforce.training.train import train

WORDS = ["a", "the", "red", "blue", "green", "ball", "balls", "falls", "bounces", "collide", "two", "one"]
WORDS += ["left", "right", "fast", "slow"]
VOCAB = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
CAPTIONS = ["a red ball falls", "two blue balls collide", "a green ball bounces left", "one ball"]
LONG = "a red ball falls left right fast slow two blue balls"  # 12 tokens with </s>: cut to TEXT_LENGTH
TEXT_LENGTH, DIM = 8, 16


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, with T5's ids for <pad> and </s>, and </s> after every text as T5's tokenizer puts it."""
    words = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A diffusers-pipeline-like root, as Wan's: text_encoder/ (a tiny random UMT5) and tokenizer/."""
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    config = UMT5Config(
        vocab_size=len(VOCAB), d_model=DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(root / "text_encoder")
    tokenizer().save_pretrained(root / "tokenizer")
    return root


def reference(encoder_dir: Path, caption: str) -> np.ndarray:
    """The encoder's own output for one caption of at most TEXT_LENGTH tokens, unpadded: [n, D]."""
    tokens = AutoTokenizer.from_pretrained(encoder_dir / "tokenizer")(
        caption, max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    encoder = UMT5EncoderModel.from_pretrained(encoder_dir / "text_encoder").eval()
    with torch.no_grad():
        return encoder(**tokens).last_hidden_state[0].numpy()


def test_text_and_the_null_text():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    text = Text(torch.randn(2, 3, 4) * mask[..., None], mask)
    dropped = text.dropped(torch.tensor([False, True]))
    assert torch.equal(dropped.states[0], text.states[0]) and torch.equal(dropped.mask[0], mask[0])
    assert (dropped.states[1] == 0).all() and not dropped.mask[1].any()
    null = text.null()
    assert not null.mask.any() and (null.states == 0).all()
    assert Text.cat([text, null]).states.shape == (4, 3, 4)
    assert Text.of({"encoder_hidden_states": text.states, "encoder_attention_mask": mask}) == text
    assert Text.of({"video": 0}) is None
    with pytest.raises(ValueError, match=r"\[B, L, D\] with encoder_attention_mask \[B, L\]"):
        Text(text.states, mask[:, :2])


def test_encoder_folders(encoder_dir, tmp_path):
    """A pipeline root, its text_encoder/ (tokenizer beside it), or one folder holding both."""
    encoder, tokens = encoder_dir / "text_encoder", encoder_dir / "tokenizer"
    assert encoder_folders(encoder_dir) == (encoder, tokens)
    assert encoder_folders(encoder) == (encoder, tokens)
    flat = tmp_path / "t5"
    T5EncoderModel(
        T5Config(vocab_size=len(VOCAB), d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).save_pretrained(flat)
    tokenizer().save_pretrained(flat / "tokenizer")
    assert encoder_folders(flat) == (flat, flat / "tokenizer")
    assert TextEncoder(flat)(["a ball"], 4).states.shape == (1, 4, 8)  # any T5-like encoder
    with pytest.raises(TextEncoderNotFound, match=r"no config\.json nor text_encoder/config\.json"):
        encoder_folders(tmp_path)
    shutil.rmtree(flat / "tokenizer")
    with pytest.raises(TextEncoderNotFound, match="no tokenizer"):
        encoder_folders(flat)


def test_prompts_are_the_encoders_output_padded(encoder_dir):
    text = TextEncoder(encoder_dir)(["a red ball falls", LONG], TEXT_LENGTH)
    assert text.states.shape == (2, TEXT_LENGTH, DIM) and text.mask.sum(1).tolist() == [5, TEXT_LENGTH]
    torch.testing.assert_close(
        text.states[0, :5], torch.from_numpy(reference(encoder_dir, "a red ball falls"))
    )
    assert (text.states[0, 5:] == 0).all()


def video_shards(out: Path, captions: list[str | None]) -> list[str]:
    video = encode_video(pattern(4, 8, 8), fps=8, crf=30)
    with ShardSink(out, maxcount=3) as sink:
        for n, caption in enumerate(captions):
            record = {"number": n} | ({} if caption is None else {"caption": caption})
            sink.write({"__key__": f"s{n}", "mp4": video, "json": record})
    return sink.shards


@pytest.fixture(scope="module")
def text_data(tmp_path_factory, encoder_dir) -> tuple[Path, Path]:
    """Video shards of 6 clips (4 frames of 8x8), all captioned, and the same with text embeddings."""
    root = tmp_path_factory.mktemp("text_data")
    video_shards(root / "videos", CAPTIONS + CAPTIONS[:2])
    encode_text(str(root / "videos/train-*.tar"), root / "text", encoder_dir, text_length=TEXT_LENGTH)
    return root / "videos", root / "text"


def test_encode_text_adds_the_encoders_output(encoder_dir, tmp_path, capsys):
    """Every captioned sample keeps its fields and gains text.npy, the encoder's own output (float16) for
    its caption, cut to text_length; samples without a caption are skipped and listed; a rerun keeps the
    shards already written; the input's folder is refused as the output."""
    shards = video_shards(tmp_path / "in", [CAPTIONS[0], None, LONG, CAPTIONS[1], CAPTIONS[2]])
    summary = encode_text(shards, tmp_path / "out", encoder_dir, text_length=TEXT_LENGTH, batch_size=2)
    assert (summary.samples, summary.written, len(summary.shards)) == (5, 4, 2)
    assert summary.skipped == [(f"{shards[0]}#s1", "no caption in the json record")]
    inputs = {s["__key__"]: s for s in read_samples(shards)}
    for sample in read_samples(summary.shards):
        record = json.loads(sample["json"])
        stored = np.load(io.BytesIO(sample["text.npy"]))
        expected = reference(encoder_dir, record["caption"])
        assert stored.dtype == np.float16 and stored.shape == expected.shape
        np.testing.assert_allclose(stored, expected, atol=2e-3, rtol=2e-3)
        assert sample["mp4"] == inputs[sample["__key__"]]["mp4"]
        assert record["text"] == {
            "encoder": str(encoder_dir),
            "dim": DIM,
            "max_length": 8,
            "tokens": len(stored),
        }
        assert record["number"] == json.loads(inputs[sample["__key__"]]["json"])["number"]
    assert encode_text(shards, tmp_path / "out", encoder_dir).kept == summary.shards
    with pytest.raises(ValueError, match="holds the input shard"):
        encode_text(shards, tmp_path / "in", encoder_dir)
    out = str(tmp_path / "out")
    main(
        [
            "encode-text",
            shards[0],
            "--encoder",
            str(encoder_dir),
            "--out",
            out,
            "--overwrite",
            "--text-length",
            "8",
        ]
    )
    assert "3 samples read, 2 written with text to 1 shards, 0 shards already encoded kept, 1 skipped" in (
        capsys.readouterr().out
    )


def test_encode_text_that_writes_nothing_fails(encoder_dir, tmp_path, capsys):
    """No samples (a text file) or no caption among them: a one-line error naming the shards, after the
    summary. A rerun that finds every shard already in --out has its output, and a fresh run writes: both
    return (exit status 0)."""
    encoder = ["--encoder", str(encoder_dir), "--text-length", "8"]
    text = tmp_path / "notes.txt"
    text.write_text("not a shard\n")
    (uncaptioned,) = video_shards(tmp_path / "bare", [None, None])
    cases = [
        (str(text), f"no samples in {text} (webdataset .tar shards with captions)"),
        (uncaptioned, f"all 2 samples read from {uncaptioned} were skipped (no caption in the json record)"),
    ]
    for shards, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(["encode-text", shards, *encoder, "--out", str(tmp_path / "out")])
        assert str(exit.value) == f"dforce encode-text: nothing written: {message}"
        assert "0 written with text to 0 shards" in capsys.readouterr().out
    assert not list((tmp_path / "out").iterdir())

    shards = video_shards(tmp_path / "in", [CAPTIONS[0], None, CAPTIONS[1], None])  # 2 shards, 1 captioned
    assert main(["encode-text", shards[0], *encoder, "--out", str(tmp_path / "out")]) is None
    assert "3 samples read, 2 written with text to 1 shards, 0 shards already encoded kept" in (
        capsys.readouterr().out
    )
    assert main(["encode-text", shards[0], *encoder, "--out", str(tmp_path / "out")]) is None  # a rerun
    assert "0 samples read, 0 written with text to 0 shards, 1 shards already encoded kept" in (
        capsys.readouterr().out
    )
    pattern = str(tmp_path / "in/train-*.tar")  # the new shard has no caption; the first is kept
    assert main(["encode-text", pattern, *encoder, "--out", str(tmp_path / "out")]) is None
    assert "1 samples read, 0 written with text to 0 shards, 1 shards already encoded kept, 1 skipped" in (
        capsys.readouterr().out
    )


def test_the_loader_yields_text(text_data):
    data = DataConfig(shards=str(text_data[1] / "*.tar"), clip_frames=4, num_workers=0, shuffle=False,
                      text_length=TEXT_LENGTH)  # fmt: skip
    batch = next(iter(make_loader(data, batch_size=3)))
    states, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
    assert states.shape == (3, TEXT_LENGTH, DIM) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [5, 5, 6]  # the captions' words and </s>
    assert (states[~mask] == 0).all() and (states[mask] != 0).any()


CONFIG = """\
output_dir: {out}
seed: 0
train: {{max_steps: 3, checkpoint_every: 3, batch_size: 2, lr: 2e-3, trackers: []}}
data: {{shards: "{data}/*.tar", clip_frames: 4, num_workers: 0, pixels: uint8, shuffle_buffer: 2,
       text_length: 8}}
noise: {{levels: 50, parameterization: v}}
trajectory: {{name: teacher}}
loss: {{drop_text: 0.5, drop_history: 0.2}}
validation: {{shards: "{data}/*.tar", every: 3, batches: 1, weightings: [teacher], rollout_clips: 1,
             context_frames: 1, rollout_frames: 2, sampling_steps: 2}}
model: {{sample_size: 8, patch_size: 4, num_layers: 1, num_attention_heads: 2, attention_head_dim: 8,
        text_dim: 16}}
"""


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, text_data) -> Path:
    root = tmp_path_factory.mktemp("text_model")
    (root / "run.yaml").write_text(CONFIG.format(out=root / "run", data=text_data[1]))
    model = train(load_config(root / "run.yaml"))
    reset_accelerate()
    return model


def test_training_on_shards_without_text_stops_at_once(text_data, text_model, tmp_path):
    """A model that reads text, on the video shards (captions, no embeddings): an error naming the shards
    and the missing key before a step is taken, as for shards without captions at all."""
    assert load_model(text_model)[0].text_dim == DIM
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(out=tmp_path / "run", data=text_data[0]))
    with pytest.raises(ConfigError, match=r"data\.shards: .*videos/train-000000\.tar.* hold no text\.npy"):
        train(load_config(path))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_self_forcing_passes_each_clips_text(text_model, text_data, tmp_path):
    """The generator's rollout, the guided teacher (text and null text) and the critic all read the clips'
    text; and the objective trains with it, its ODE initialisation too."""
    student = (
        f"output_dir: {tmp_path / 'sf'}\nseed: 0\nobjective: self_forcing\n"
        f"self_forcing: {{teacher: '{text_model}', steps: 2, context_frames: 1, critic_steps: 1, "
        "min_level: 2, max_level: 48, text_guidance: 3.0, init: ode, ode_steps: 1, ode_sampling_steps: 4}\n"
        "train: {max_steps: 1, checkpoint_every: 1, batch_size: 2, lr: 1e-4, trackers: []}\n"
        f"data: {{shards: '{text_data[1]}/*.tar', clip_frames: 4, num_workers: 0, pixels: uint8, "
        "shuffle_buffer: 2, text_length: 8}\n"
    )
    (tmp_path / "sf.yaml").write_text(student)
    config = load_config(tmp_path / "sf.yaml")
    model, noise = load_model(text_model)
    core = SelfForcing(config, noise.build(), model, model)
    data = DataConfig(shards=str(text_data[1] / "*.tar"), clip_frames=4, num_workers=0, text_length=8)
    batch = next(iter(make_loader(data, batch_size=2)))
    batch["video"] = batch["video"].float()
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("encoder_attention_mask")),
                                    with_kwargs=True)  # fmt: skip
    with torch.no_grad():
        clip = core.rollout(model, batch, seed=0, plan=Plan(0, [1, 0, 1]))
    mask = batch["encoder_attention_mask"]
    assert seen and all(torch.equal(m, mask) for m in seen)
    seen.clear()
    core.distribution_matching(model, model, clip, seed=0, real=1, batch=batch)
    assert [m.any().item() for m in seen] == [True, False, True]  # teacher, teacher unconditional, critic
    assert torch.equal(seen[0], mask) and torch.equal(seen[2], mask)
    # Against a negative prompt (one prompt of 3 tokens, padded to the clips' 8): the teacher's other branch.
    negative = Text(torch.randn(1, 3, DIM), torch.ones(1, 3, dtype=torch.bool))
    core.negative, states = negative, []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: states.append(kwargs.get("encoder_hidden_states")), with_kwargs=True
    )
    seen.clear()
    core.distribution_matching(model, model, clip, seed=0, real=1, batch=batch)
    assert seen[1].tolist() == [[True] * 3 + [False] * 5] * 2
    assert torch.equal(states[1][:, :3], negative.states.to(states[1].dtype).expand(2, -1, -1))
    assert (states[1][:, 3:] == 0).all()
    with pytest.raises(ConfigError, match=r"self_forcing\.text_guidance: the teacher reads no text"):
        textless = CausalVideoTransformer.from_config({**model.config, "text_dim": None})
        SelfForcing(config, noise.build(), textless, textless)
    assert (train(config) / "config.json").is_file()


def test_sample_with_a_prompt(text_model, encoder_dir, tmp_path):
    """`dforce sample --prompt` end to end, the same video from --prompt-embeds of the same prompt, and a
    text guidance that changes it; clear errors for a prompt to a model without text."""
    out = {name: tmp_path / f"{name}.mp4" for name in ("prompt", "embeds", "guided")}
    common = ["sample", "--model", str(text_model), "--frames", "3", "--steps", "2", "--seed", "1"]
    prompt = ["--prompt", "a red ball falls", "--text-encoder", str(encoder_dir), "--text-length", "8"]
    main([*common, *prompt, "--out", str(out["prompt"])])
    TextEncoder(encoder_dir)(["a red ball falls"], 8).save(tmp_path / "prompt.safetensors")
    main([*common, "--prompt-embeds", str(tmp_path / "prompt.safetensors"), "--out", str(out["embeds"])])
    main([*common, *prompt, "--text-guidance", "4", "--out", str(out["guided"])])
    assert out["prompt"].read_bytes() == out["embeds"].read_bytes() != out["guided"].read_bytes()
    plain = tmp_path / "plain"
    CausalVideoTransformer(sample_size=8, patch_size=4, num_frames=4, num_layers=1).save_pretrained(plain)
    NoiseConfig(levels=50).save(plain)
    for arguments, message in [
        (["--model", str(plain), *prompt[:4]], "--prompt: the model .* reads no text"),
        (["--model", str(text_model), *prompt[:2]], "--prompt needs --text-encoder"),
        (["--model", str(text_model), "--text-guidance", "2"], "--text-guidance needs --prompt"),
        (
            ["--model", str(text_model), "--prompt-embeds", str(tmp_path / "missing")],
            "missing: not a safetensors",
        ),
    ]:
        with pytest.raises(SystemExit, match=message):
            main(["sample", "--frames", "1", "--steps", "1", "--out", str(tmp_path / "x.mp4"), *arguments])
