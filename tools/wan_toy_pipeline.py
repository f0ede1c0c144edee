"""A toy stand-in for a downloaded Wan 2.1 / SkyReels-V2 diffusers pipeline, and captioned videos, to try
docs/lora_wan.md's "Fine-tuning Wan 2.1 / SkyReels-V2" workflow on a CPU in minutes, with nothing downloaded.

    python tools/wan_toy_pipeline.py outputs/wan_toy                       # Wan 2.1's classes
    python tools/wan_toy_pipeline.py outputs/wan_toy --transformer skyreels  # SkyReels-V2's transformer

writes OUT/pipeline/ in the layout of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (model_index.json, transformer/,
vae/, text_encoder/, tokenizer/), every component a tiny random model of the real class written by its own
`save_pretrained`, and OUT/videos/ (short bouncing-balls mp4s) with OUT/videos/captions.csv. The page's
commands then run with WAN=OUT/pipeline and the data folders under OUT, plus the overrides that page
lists for the toy's sizes (latent frames of 8 x 14, 16 latent channels as Wan's VAE has).

The components keep the real layouts: `WanTransformer3DModel` (or `SkyReelsV2Transformer3DModel`) with
patch (1, 2, 2) and 16 latent channels; `AutoencoderKLWan` with 4x compression in time and 8x in space and
Wan's per-channel latent statistics; a `UMT5EncoderModel`; a word-level tokenizer with T5's <pad>, </s> and
<unk> ids (unknown words are <unk>). Their widths are toy widths, and their weights are random: the videos
they make are noise, and the point is that every command runs through the real code paths.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

TEXT_DIM = 32  # the toy UMT5's width, which the toy transformer's text_dim matches (Wan: 4096)
COLOR_NAMES = ["red", "green", "yellow", "blue", "orange", "purple", "cyan", "pink"]  # synthetic.COLORS
WORDS = ["a", "an", "the", "one", "two", "three", "four", *COLOR_NAMES, "ball", "balls", "bounce", "bounces"]
WORDS += ["bouncing", "fall", "falls", "collide", "roll", "rolls", "left", "right", "up", "down", "fast"]
WORDS += ["slow", "on", "black", "background", "small", "large", "and", "of", "in"]
NUMBERS = ["one", "two", "three", "four"]
TRANSFORMERS = ("wan", "skyreels")


def tokenizer():
    """Word-level, with T5's ids for <pad> (0), </s> (1) and <unk> (2), and </s> after every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def write_pipeline(out: str | Path, transformer: str = "wan", seed: int = 0) -> Path:
    """OUT: a diffusers Wan text-to-video pipeline folder of tiny random components; returns OUT."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if transformer not in TRANSFORMERS:
        raise ValueError(f"transformer must be one of {', '.join(TRANSFORMERS)}, got {transformer!r}")
    out = Path(out)
    torch.manual_seed(seed)
    shape = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2,
    )  # fmt: skip
    if transformer == "wan":
        WanTransformer3DModel(**shape).save_pretrained(out / "transformer")
    else:
        SkyReelsV2Transformer3DModel(**shape).save_pretrained(out / "transformer")
    # Wan 2.1's VAE layout (4x in time, 8x in space, 16 channels, its latents_mean/std) at toy width.
    AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).save_pretrained(out / "vae")
    config = UMT5Config(
        vocab_size=len(WORDS) + 3, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8,
    )  # fmt: skip
    UMT5EncoderModel(config).save_pretrained(out / "text_encoder")
    tokenizer().save_pretrained(out / "tokenizer")
    pipeline = "WanPipeline" if transformer == "wan" else "SkyReelsV2DiffusionForcingPipeline"
    transformer_class = "WanTransformer3DModel" if transformer == "wan" else "SkyReelsV2Transformer3DModel"
    index = {
        "_class_name": pipeline,
        "transformer": ["diffusers", transformer_class],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_videos(out: str | Path, videos: int = 6, frames: int = 45, size: int = 128) -> Path:
    """OUT/video_N.mp4: bouncing balls (1-3 coloured balls, `size` square, 16 fps), and OUT/captions.csv
    (`path,caption`, the caption naming the balls); returns OUT."""
    from dforce.data.shards import encode_video
    from dforce.data.synthetic import COLORS, bouncing_balls

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(videos):
        balls = 1 + index % 3
        pixels, record = bouncing_balls(index, frames, size, num_balls=balls, seed=7)
        names = [COLOR_NAMES[COLORS.tolist().index(color)] for color in record["colors"]]
        things = "ball bounces" if balls == 1 else "balls bounce"
        caption = f"{NUMBERS[balls - 1]} {' and '.join(names)} {things} on a black background"
        name = f"video_{index}.mp4"
        (out / name).write_bytes(encode_video(pixels, fps=16, crf=18))
        rows.append({"path": name, "caption": caption})
    with (out / "captions.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", help="folder for pipeline/ and videos/")
    parser.add_argument("--transformer", choices=TRANSFORMERS, default="wan", help="the transformer's class")
    parser.add_argument("--videos", type=int, default=6, help="videos to write")
    parser.add_argument("--frames", type=int, default=45, help="frames per video")
    args = parser.parse_args(argv)
    pipeline = write_pipeline(Path(args.out) / "pipeline", args.transformer)
    videos = write_videos(Path(args.out) / "videos", args.videos, args.frames)
    print(f"pipeline: {pipeline}\nvideos and captions.csv: {videos}")


if __name__ == "__main__":
    main()
