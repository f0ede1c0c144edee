"""The commands' bodies: each takes the parsed arguments of its `dforce COMMAND` (`dforce.cli`) and
imports what it needs when it runs, so that `dforce --help` and a bad argument answer at once."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from dforce import DforceError

if TYPE_CHECKING:
    import torch

    from dforce.data.text import Text
    from dforce.diffusion.recipe import SamplingRecipe


def check_choice(flag: str, value: str, table: Collection[str]) -> None:
    """A ValueError naming the flag and the valid names of the table the code uses."""
    if value not in table:
        what = flag.removeprefix("--")
        raise ValueError(f"{flag}: unknown {what} '{value}'; choose from {', '.join(table)}")


def nothing_written(
    inputs: str, read: int, noun: str, skipped: list[tuple[str, str]], hint: str = ""
) -> DforceError:
    """The one-line error of a command that wrote nothing from `inputs`: that they held no `noun`, or that
    all `read` were skipped, and why (one reason, or the one they share; else the summary lists them)."""
    if not read:
        return DforceError(f"nothing written: no {noun}s in {inputs}{hint}")
    reasons = {reason for _, reason in skipped}
    if len(skipped) == 1:
        why = f"{skipped[0][0]}: {skipped[0][1]}"
    else:
        why = reasons.pop() if len(reasons) == 1 else "each reason is listed above"
    where = f"read from {inputs}"
    what = f"the {noun} {where} was" if read == 1 else f"all {read} {noun}s {where} were"
    return DforceError(f"nothing written: {what} skipped ({why})")


def sampling(
    args: argparse.Namespace, matrices: bool = False, defaults: SamplingRecipe | None = None
) -> tuple[SamplingRecipe, str]:
    """`dforce sample`'s and `dforce eval`'s sampling settings: the model's recipe (`sampling.json`, else
    `defaults`, else `SamplingRecipe()`) with the flags given over it (`dforce.diffusion.recipe.resolve`),
    and the line that says what was used and whence. The names given are checked first, against the code's
    own tables (`matrices`: a .json schedule too), before the model is read."""
    from dforce.diffusion.recipe import SamplingRecipe, resolve
    from dforce.diffusion.sampler import SAMPLERS
    from dforce.diffusion.scheduling import SCHEDULING_OPTIONS

    if args.scheduling is not None and not (matrices and args.scheduling.endswith(".json")):
        check_choice("--schedule", args.scheduling, SCHEDULING_OPTIONS)
    if args.sampler is not None:
        check_choice("--sampler", args.sampler, SAMPLERS)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingRecipe)}
    return resolve(args.model, given, (defaults, "the command's defaults") if defaults else None)


def plot_weights(args: argparse.Namespace) -> None:
    from dforce.diffusion.trajectory import get_weighting
    from dforce.evaluation.plots import plot_weightings

    weightings = []
    for name in args.weightings.split(","):
        options = {"cube_levels": args.cube_levels}
        if name == "mixture":
            options["components"] = {"paths": 0.5, "teacher": 0.5}
        weightings.append(get_weighting(name, args.frames, args.levels, args.block, **options))
    out = plot_weightings(weightings, args.out, samples=args.samples)
    print(f"wrote {out}")


def make_shards(args: argparse.Namespace) -> None:
    from dforce.data.clips import parse_size
    from dforce.data.reading import name_shards
    from dforce.data.shards import VIDEO_SUFFIXES, make_shards

    summary = make_shards(
        args.inputs,
        args.out,
        clip_frames=args.clip_frames,
        stride=args.stride,
        size=parse_size(args.size) if args.size else None,
        reencode=args.reencode,
        crf=args.crf,
        pix_fmt=args.pix_fmt,
        labels=args.labels,
        prefix=args.prefix,
        maxcount=args.maxcount,
        maxsize=args.maxsize,
        overwrite=args.overwrite,
        progress=True,
    )
    print(summary)
    if not summary.samples:
        hint = f" (folders are searched for {', '.join(VIDEO_SUFFIXES)})"
        raise nothing_written(name_shards(args.inputs), summary.videos, "video", summary.skipped, hint)


def encode_latents(args: argparse.Namespace) -> None:
    import torch

    from dforce.data.clips import parse_size
    from dforce.data.encode_latents import encode_latents

    summary = encode_latents(
        args.shards,
        args.out,
        args.vae,
        subfolder=args.subfolder,
        size=parse_size(args.size) if args.size else None,
        tiling=args.tiling,
        slicing=args.slicing,
        batch_frames=args.batch_frames,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=getattr(torch, args.dtype),
        prefix=args.prefix,
        maxcount=args.maxcount,
        overwrite=args.overwrite,
        keep_video=args.keep_video,
        progress=True,
    )
    print(summary)
    if not summary.samples:
        hint = " (webdataset .tar shards of videos)"
        raise nothing_written(args.shards, summary.videos, "sample", summary.skipped, hint)


def encode_text(args: argparse.Namespace) -> None:
    import torch

    from dforce.data.encode_text import encode_text
    from dforce.data.text import TextEncoder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (args.prompt is None) == (args.shards is None):
        raise ValueError("give SHARDS (captioned shards to encode) or --prompt TEXT (one prompt), not both")
    if args.prompt is not None:
        text = TextEncoder(args.encoder, device, getattr(torch, args.dtype))([args.prompt], args.text_length)
        text.save(args.out)
        print(f"wrote the embeddings of {int(text.mask.sum())} tokens to {args.out}")
        return
    summary = encode_text(
        args.shards,
        args.out,
        args.encoder,
        text_length=args.text_length,
        batch_size=args.batch_size,
        device=device,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
        progress=True,
    )
    print(summary)
    if not summary.shards and not summary.kept:  # a rerun with every shard already in --out is done
        hint = " (webdataset .tar shards with captions)"
        raise nothing_written(args.shards, summary.samples, "sample", summary.skipped, hint)


def prompt_text(args: argparse.Namespace, text_dim: int | None, device: torch.device) -> Text | None:
    """`dforce sample`'s text (`dforce.data.text.Text`) from --prompt or --prompt-embeds, None without
    either."""
    import torch

    from dforce.data.text import Text, TextEncoder

    if args.prompt is None and args.prompt_embeds is None:
        if args.text_guidance not in (None, 1):
            raise ValueError("--text-guidance needs --prompt or --prompt-embeds")
        return None
    flag = "--prompt" if args.prompt is not None else "--prompt-embeds"
    if text_dim is None:
        raise ValueError(f"{flag}: the model {args.model} reads no text (it was built without text_dim)")
    if args.prompt_embeds is not None:
        text = Text.load(args.prompt_embeds)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        text = TextEncoder(args.text_encoder, device, dtype)([args.prompt], args.text_length)
    if text.states.shape[0] != 1 or text.states.shape[2] != text_dim:
        raise ValueError(
            f"{flag}: text embeddings of shape {list(text.states.shape)}; the model reads [1, L, {text_dim}]"
        )
    return text.to(device)


def make_synthetic(args: argparse.Namespace) -> None:
    from dforce.data.synthetic import write_bouncing_balls

    shards = write_bouncing_balls(
        args.out,
        args.clips,
        args.frames,
        args.size,
        args.balls,
        args.seed,
        speed=tuple(args.speed),
        radius=tuple(args.radius),
        fps=args.fps,
        prefix=args.prefix,
        maxcount=args.maxcount,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.clips} clips to {len(shards)} shards in {args.out}")


def train(args: argparse.Namespace) -> None:
    from dforce.training.config import load_config
    from dforce.training.train import train

    model = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"model written to {model}")


def sample(args: argparse.Namespace) -> None:
    import json

    import torch

    from dforce.data.clips import resize_crop
    from dforce.data.latents import LatentSpace, latents_within
    from dforce.data.loader import to_float
    from dforce.data.vae import load_decoder
    from dforce.data.video import read_clip, side_by_side, to_uint8, write_video
    from dforce.diffusion.recipe import SAMPLE_DEFAULTS
    from dforce.diffusion.rollout import chunk_schedule, rollout
    from dforce.training.checkpoint import load_model

    out = args.out or str(Path(args.model).parent / "samples" / f"sample_seed{args.seed}.mp4")
    if not out.endswith(".mp4"):
        raise ValueError(f"--out {out}: must be a .mp4 file (a .gif is written beside it)")
    recipe, line = sampling(args, matrices=True, defaults=SAMPLE_DEFAULTS)  # before the model is loaded
    if args.prompt is not None and (args.prompt_embeds is not None or args.text_encoder is None):
        raise ValueError("--prompt needs --text-encoder DIR, and excludes --prompt-embeds")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, noise = load_model(args.model)
    model.to(device)
    text = prompt_text(args, model.text_dim, device)
    schedule_args = recipe.schedule_kwargs()
    if recipe.scheduling.endswith(".json"):
        try:
            schedule_args["scheduling"] = json.loads(Path(recipe.scheduling).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"--schedule {recipe.scheduling}: {error}") from None
    _, window = chunk_schedule(model, noise.levels, **schedule_args)

    channels, *size = model.frame_shape
    space = LatentSpace.of_model(args.model)
    decoder = None if space is None else load_decoder(space, device, args.vae)
    scale = 1 if space is None else space.spatial_compression  # pixels per model pixel
    fps, real = args.fps, None
    context = torch.zeros(1, 0, channels, *size)  # [B, T0, C, H, W]
    if args.context is not None:
        clip, clip_fps = read_clip(args.context, args.context_index)
        real = to_float(resize_crop(clip, [side * scale for side in size]))  # [P, C, H, W] in [-1, 1]
        available = len(real) if space is None else latents_within(space, len(real))
        known = args.context_frames
        if known is None:
            block = model.frames_per_block
            known = min(available, window) // block * block
        if known > available:
            raise ValueError(
                f"--context-frames {known}: {args.context} has only {len(real)} frames"
                + ("" if space is None else f", {available} latent frames")
            )
        if decoder is None:
            context = real[None, :known]
        elif known:  # the VAE encodes the pixel frames that `known` latents stand for
            context = decoder.encode(real[: space.pixel_frames(known)].to(device))[None]
        fps = fps or clip_fps
    elif args.context_frames:
        raise ValueError("--context-frames needs --context")
    fps = fps or 8.0

    print(line)
    video = rollout(
        model,
        noise.build(),
        noise.parameterization,
        context.to(device),
        args.frames,
        **(recipe.rollout_kwargs() | schedule_args),
        labels=None if args.label is None else torch.tensor([args.label], device=device),
        text=text,
        use_cache=not args.no_cache,
        generator=torch.Generator(device).manual_seed(args.seed),
        progress=True,
    )[0]  # [T0 + frames, C, H, W]
    if decoder is not None:
        video = decoder(video)  # [P, C, H', W'] pixels
    written = write_video(out, to_uint8(video), fps, args.scale)
    given = context.shape[1]  # model frames of context, and the pixel frames they stand for:
    shown = given if space is None or not given else space.pixel_frames(given)
    if real is not None and len(real) > shown:
        pair = side_by_side(video.cpu(), real)
        written += write_video(out.removesuffix(".mp4") + "_vs_real.mp4", to_uint8(pair), fps, args.scale)
    print("wrote " + ", ".join(map(str, written)))


def evaluate(args: argparse.Namespace) -> None:
    import re

    import torch

    from dforce.data.latents import LatentSpace
    from dforce.data.vae import load_decoder
    from dforce.evaluation.compare import table
    from dforce.evaluation.evaluate import EvalSettings, evaluate, read_clips, write_report
    from dforce.training.checkpoint import load_model

    recipe, line = sampling(args)  # before the model and clips are read
    own = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings) if not hasattr(recipe, f.name)
    }
    settings = EvalSettings(**dataclasses.asdict(recipe), **own)  # the recipe, and what only eval does
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, noise = load_model(args.model)
    model.to(device)
    space = LatentSpace.of_model(args.model)
    decoder = None if space is None else load_decoder(space, device, args.vae)
    size = list(model.frame_shape[1:]) if space is None else None  # latents keep their encoded size
    clips = read_clips(args.data, args.clips, args.context_frames + args.frames, size, decoder)
    print(line)
    result = evaluate(model, noise, clips, settings, decoder)
    out = Path(args.out) if args.out else Path(args.model).parent / "eval"
    written = write_report(result, out, title=f"{args.model} on {args.data}, {settings.scheduling}")
    bands = re.compile(r"_\d+-\d+x(_se)?$")  # printed as the table below
    summary = {k: v for k, v in result["summary"].items() if not bands.search(k)}
    print(", ".join(f"{key} {value:.4g}" for key, value in summary.items()))
    print(table([result], [args.model]), end="")
    print("wrote " + ", ".join(map(str, written)))


def compare(args: argparse.Namespace) -> None:

    from dforce.evaluation.compare import compare as table

    text = table(args.evals, args.names.split(",") if args.names else None)
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


def ablate(args: argparse.Namespace) -> None:
    from dforce.evaluation.ablate import ablate

    root = ablate(
        args.config,
        args.weightings.split(","),
        args.seeds,
        args.overrides,
        schedules=args.schedules.split(","),
        clips=args.clips,
        elbo_draws=args.elbo_draws,
        out=args.out,
    )
    print((root / "results.md").read_text(), end="")
    print(f"wrote {root}/results.csv, results.md, frames.csv, loss_by_level.csv and plots (*.png)")


def export(args: argparse.Namespace) -> None:
    from dforce.data.latents import LatentSpace
    from dforce.diffusion.recipe import SamplingRecipe
    from dforce.models.lora import has_lora, merge_lora
    from dforce.training.checkpoint import MODEL, load_model, write_model

    source, out = Path(args.source), Path(args.out)
    if out.exists():
        raise ValueError(f"--out {out}: exists; give a new directory")
    if source.is_file():
        return export_released(args)
    if (source / MODEL).is_dir():  # a run directory: its exported model
        source = source / MODEL
    model, noise = load_model(source)
    adapted = has_lora(model)
    if args.merge_lora:
        model = merge_lora(model)
    write_model(model, noise, out, LatentSpace.of_model(source), recipe=SamplingRecipe.load(source))
    what = "LoRA adapters merged into the weights" if args.merge_lora else "LoRA adapters beside the base"
    print(f"wrote {out}" + (f" ({what})" if adapted else ""))


def export_released(args: argparse.Namespace) -> None:
    """`dforce export CHECKPOINT.pt --base WAN`: a released causal Wan generator as a model directory."""
    from dforce.data.clips import parse_size
    from dforce.training.checkpoint import import_released

    if args.base is None:
        raise ValueError(f"{args.source}: a released checkpoint needs --base, the Wan folder of its config")
    size = parse_size(args.sample_size)
    settings = {"num_frames": args.num_frames, "frames_per_block": args.frames_per_block}
    settings["sample_size"] = (size, size) if isinstance(size, int) else size
    key = import_released(args.source, args.base, Path(args.out), args.key, **settings)
    print(f"wrote {args.out} from {args.source}" + (f" ({key})" if key else ""))
