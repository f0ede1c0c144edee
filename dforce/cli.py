"""`dforce COMMAND ...`: one entry point for every job."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from dforce import DforceError, __version__, commands
from dforce.diffusion.recipe import FLAGS, SAMPLE_DEFAULTS, SamplingRecipe

DEFAULT_WEIGHTINGS = "independent,paths,teacher,sync,schedule:pyramid,mixture"


def add_sampling_flags(
    parser: argparse.ArgumentParser, schedules: str, fallback: SamplingRecipe | None = None
) -> None:
    """The sampling flags of `dforce sample` and `dforce eval`, each a field of the model's sampling recipe
    (`dforce.diffusion.recipe.SamplingRecipe`): left out, the model's `sampling.json` says, else
    `fallback` (default: the recipe's defaults)."""
    defaults = dataclasses.asdict(fallback or SamplingRecipe())
    for name, kind, what in (
        ("sampler", str, "ddim, ddpm, euler or renoise (`dforce.diffusion.sampler.SAMPLERS`)"),
        ("eta", float, "ddim stochasticity, 0 (deterministic) .. 1"),
        ("steps", int, "denoising steps per frame"),
        ("shift", float, "timestep shift of the steps (>1: more at high noise)"),
        ("scheduling", str, schedules),
        ("block", int, "frames denoised together (AR, pyramid)"),
        ("offset", int, "pyramid: steps between neighbouring frames"),
        ("chunk", int, "frames per scheduling matrix"),
        ("guidance", float, "classifier-free guidance over the labels (and actions)"),
        ("history_guidance", float, "guidance over the history (unconditional: pure noise)"),
        ("text_guidance", float, "guidance over the text (unconditional: no tokens)"),
        ("context_noise", int, "level at which finished frames are seen"),
        ("sink", int, "first frames kept in the KV cache's window for good"),
    ):
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        default = "" if defaults[name] is None else f", else {defaults[name]}"
        help = f"{what} (default: the model's{default})"
        metavar = flag[2:].upper().replace("-", "_")
        parser.add_argument(flag, dest=name, type=kind, default=None, metavar=metavar, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dforce", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dforce {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True)

    plot = subcommands.add_parser(
        "plot-weights",
        help="heatmaps of trajectory weightings",
        description="Two frames: exact edge probabilities over the K x K grid. More frames: the sampled "
        "distribution of the level at which each frame is trained.",
    )
    plot.add_argument("--frames", type=int, default=2)
    plot.add_argument("--block", type=int, default=1, help="frames per block, the unit of the cube")
    plot.add_argument("--levels", type=int, default=16, help="diffusion levels K")
    plot.add_argument("--cube-levels", type=int, default=None, help="coarser cube resolution (default K)")
    plot.add_argument(
        "--weightings",
        default=DEFAULT_WEIGHTINGS,
        help="comma-separated names; 'mixture' is paths+teacher at 1:1",
    )
    plot.add_argument("--samples", type=int, default=100_000, help="samples per weighting (frames > 2)")
    plot.add_argument("--out", default="outputs/weights.png")
    plot.set_defaults(run=commands.plot_weights)

    shards = subcommands.add_parser(
        "make-shards",
        help="video files and folders -> webdataset shards",
        description="One sample per video, or per clip with --clip-frames: the video bytes and a json "
        "record (source, fps, frames, size, and the fields of a sidecar VIDEO.json or a --labels CSV). "
        "Clips, --size and --reencode write H.264 mp4; otherwise the file is kept as it is, once it "
        "decodes. Unreadable, too short and empty videos are skipped and listed at the end.",
    )
    shards.add_argument(
        "inputs", nargs="+", help="video files (any container decord reads) and folders of them"
    )
    shards.add_argument("--out", required=True, help="output folder")
    shards.add_argument(
        "--clip-frames", type=int, default=None, help="cut every video into clips of N frames"
    )
    shards.add_argument("--stride", type=int, default=None, help="frames between clip starts (default N)")
    shards.add_argument("--size", default=None, help="N: short side N, aspect kept; HxW: scale, centre-crop")
    shards.add_argument("--reencode", action="store_true", help="re-encode even without clips or --size")
    shards.add_argument("--crf", type=int, default=12, help="H.264 quality, 0 (lossless) .. 51")
    shards.add_argument(
        "--pix-fmt",
        default="yuv444p",
        choices=["yuv444p", "yuv420p"],
        help="yuv420p plays everywhere, even sizes",
    )
    shards.add_argument(
        "--labels",
        default=None,
        help="CSV with a header path,label[,caption,...]; paths relative to the CSV. A sidecar VIDEO.json "
        '({"label": 3, "caption": "...", "actions": [[...] per frame]}) is read as well.',
    )
    shards.add_argument("--prefix", default="train", help="shards are PREFIX-000000.tar, ...")
    shards.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    shards.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    shards.add_argument(
        "--overwrite", action="store_true", help="delete PREFIX-*.tar shards already in --out"
    )
    shards.set_defaults(run=commands.make_shards)

    latents = subcommands.add_parser(
        "encode-latents",
        help="video shards -> latent shards, through a diffusers VAE",
        description="Encodes every video sample of SHARDS with a diffusers autoencoder from a local folder "
        "(AutoencoderKL frame by frame; AutoencoderKLWan, CogVideoX and LTX whole clips) and writes "
        "latent.npy (float16 [T', c, h, w], unscaled) with the video's json record, whose `latent` entry "
        "says what the latents mean (the VAE, its compressions and normalisation, the frames encoded). A "
        "causal video VAE encodes 1 + rk frames (Wan: 1 + 4k): any other length of the first sample is an "
        "error naming the nearest valid ones, and a later sample of such a length is skipped and listed.",
    )
    latents.add_argument("shards", help="video shards: a list (a::b), glob or brace pattern")
    latents.add_argument("--vae", required=True, help="local folder of a diffusers autoencoder or pipeline")
    latents.add_argument("--subfolder", default=None, help="the VAE's folder inside --vae, e.g. vae")
    latents.add_argument("--out", required=True, help="output folder")
    latents.add_argument("--size", default=None, help="N (square) or HxW: scale to cover, centre-crop first")
    latents.add_argument("--tiling", action="store_true", help="encode large frames tile by tile")
    latents.add_argument("--slicing", action="store_true", help="one frame per VAE call (image VAEs)")
    latents.add_argument("--batch-frames", type=int, default=16, help="frames per VAE call (image VAEs)")
    latents.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    latents.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    latents.add_argument("--prefix", default="train", help="shards are PREFIX-000000.tar, ...")
    latents.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    latents.add_argument(
        "--overwrite", action="store_true", help="delete PREFIX-*.tar shards already in --out"
    )
    latents.add_argument(
        "--keep-video", action="store_true", help="also store each video file, to compare with later"
    )
    latents.set_defaults(run=commands.encode_latents)

    text = subcommands.add_parser(
        "encode-text",
        help="shards with captions -> the same shards with text embeddings, through a text encoder",
        description="Encodes the `caption` of every sample of SHARDS (video or latent shards) with a "
        "transformers text encoder from a local folder (T5, UMT5 as Wan's, mT5; or a diffusers pipeline "
        "root with text_encoder/ and tokenizer/) and writes each shard NAME.tar to OUT/NAME.tar with every "
        "sample's fields plus text.npy (float16 [n, D], the n token embeddings, padding left out) and a "
        "`text` entry in its json record. A rerun skips the shards already written; samples without a "
        "caption are skipped and listed. With --prompt instead of SHARDS: one prompt's embeddings to the "
        "file --out (safetensors), for `dforce sample --prompt-embeds` and `self_forcing.negative_prompt`.",
    )
    text.add_argument(
        "shards", nargs="?", default=None, help="shards with captions: a list (a::b), glob or brace pattern"
    )
    text.add_argument("--prompt", default=None, help="encode this one prompt to the file --out instead")
    text.add_argument("--encoder", required=True, help="local folder of the text encoder or pipeline")
    text.add_argument("--out", required=True, help="output folder (not the input's); with --prompt a file")
    text.add_argument("--text-length", type=int, default=512, help="tokens kept per caption at most")
    text.add_argument("--batch-size", type=int, default=16, help="captions per encoder call")
    text.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    text.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    text.add_argument("--overwrite", action="store_true", help="encode again the shards already in --out")
    text.set_defaults(run=commands.encode_text)

    synthetic = subcommands.add_parser(
        "make-synthetic",
        help="bouncing-balls shards, the built-in dataset",
        description="Coloured balls with elastic collisions, encoded as H.264; every ball's position and "
        "velocity per frame is in the json record. Deterministic by seed.",
    )
    synthetic.add_argument("--out", default="outputs/data/bouncing_balls")
    synthetic.add_argument("--clips", type=int, default=512)
    synthetic.add_argument("--frames", type=int, default=32, help="frames per clip")
    synthetic.add_argument("--size", type=int, default=32, help="frame side in pixels (32 or 64 are usual)")
    synthetic.add_argument("--balls", type=int, default=3)
    for flag, default, what in (
        ("--speed", [0.03, 0.06], "ball speeds, in frame sides per frame"),
        ("--radius", [0.08, 0.14], "ball radii, in frame sides"),
    ):
        synthetic.add_argument(
            flag, type=float, nargs=2, default=default, metavar=("LOW", "HIGH"), help=f"range of {what}"
        )
    synthetic.add_argument("--seed", type=int, default=0, help="use another seed for a held-out split")
    synthetic.add_argument("--fps", type=float, default=10.0)
    synthetic.add_argument("--prefix", default="train")
    synthetic.add_argument("--maxcount", type=int, default=256, help="clips per shard")
    synthetic.add_argument("--overwrite", action="store_true")
    synthetic.set_defaults(run=commands.make_synthetic)

    training = subcommands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from CONFIG (see configs/), with dotted overrides such as train.max_steps=200. "
        "Running the same command again resumes from the newest checkpoint in output_dir, once the config "
        "is checked to be the same run's (train.max_steps, validation.* and a few more may change). For "
        "several processes: accelerate launch [--multi_gpu --num_processes N] -m dforce train CONFIG ...",
    )
    training.add_argument("config", help="YAML config file")
    training.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.max_steps=200")
    training.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto: the newest checkpoint of output_dir (default); never: start over, moving an earlier run "
        "in output_dir aside; PATH: that checkpoint of output_dir (later ones are moved aside)",
    )
    training.set_defaults(run=commands.train)

    sampler = subcommands.add_parser(
        "sample",
        help="generate a video from a trained model, continuing given context frames",
        description="Rolls a trained model out for --frames frames after the context, chunk by chunk along a "
        "scheduling matrix, in a sliding window within the training horizon (KV-cached unless --no-cache), "
        "sampled as the model's sampling.json says (the settings it was validated with) but where a sampling "
        "flag says otherwise; the settings used are printed in one line. "
        "Writes OUT (.mp4) and OUT with .gif; with a --context clip longer than the context, also "
        "OUT_vs_real.mp4/.gif: generated frames left, real frames right. The same --seed gives the same "
        "video.",
    )
    sampler.add_argument("--model", required=True, help="a model directory written by training")
    sampler.add_argument(
        "--frames",
        type=int,
        required=True,
        help="model frames to generate after the context (latent ones for a latent model)",
    )
    sampler.add_argument(
        "--vae", default=None, help="a latent model's VAE folder, if not where its vae.json says it was"
    )
    sampler.add_argument("--context", default=None, help="a video file, or shards (.tar, glob or pattern)")
    sampler.add_argument("--context-index", type=int, default=0, help="which shard sample to continue")
    sampler.add_argument(
        "--context-frames",
        type=int,
        default=None,
        help="T0: the first frames of the clip to continue (default: as many as the window holds)",
    )
    add_sampling_flags(
        sampler,
        "autoregressive, pyramid, sync, teacher, or a .json file holding a custom matrix over the chunk's "
        "frames (rows from all K to all 0)",
        SAMPLE_DEFAULTS,
    )
    sampler.add_argument("--label", type=int, default=None, help="class label, for class-conditional models")
    sampler.add_argument("--prompt", default=None, help="text, for a model trained with text (text_dim)")
    sampler.add_argument("--text-encoder", default=None, help="the text encoder folder --prompt needs")
    sampler.add_argument("--text-length", type=int, default=512, help="tokens of --prompt kept at most")
    sampler.add_argument(
        "--prompt-embeds",
        default=None,
        help="instead of --prompt: a .safetensors file of dforce.data.text.Text",
    )
    sampler.add_argument(
        "--no-cache", action="store_true", help="recompute the window every step (reference)"
    )
    sampler.add_argument("--seed", type=int, default=0)
    sampler.add_argument("--fps", type=float, default=None, help="default: the context's, else 8")
    sampler.add_argument("--scale", type=int, default=1, help="show each pixel as SCALE x SCALE")
    sampler.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    sampler.add_argument(
        "--out",
        default=None,
        help="FILE.mp4; FILE.gif is written beside it (default: samples/sample_seedSEED.mp4 beside the "
        "model directory)",
    )
    sampler.set_defaults(run=commands.sample)

    evaluation = subcommands.add_parser(
        "eval",
        help="score a model's rollouts of held-out clips frame by frame, and its likelihood",
        description="Continues each clip from its first --context-frames frames for --frames frames and "
        "scores every generated frame against the real one (MSE, PSNR, SSIM; for bouncing balls the "
        "distance of each ball, found by its colour, from the recorded physics, and whether all are "
        "found), by frame index inside and past the training horizon. Also the ELBO (bits per 8-bit "
        "subpixel) along the rollout's path and, with --ode-steps, the probability-flow ODE likelihood. "
        "Rollouts are sampled as the model's sampling.json says (the settings it was validated with) but "
        "where a sampling flag says otherwise; the settings used are printed in one line. "
        "Writes metrics.json, metrics.csv and metrics.png to --out.",
    )
    evaluation.add_argument("--model", required=True, help="a model directory written by training")
    evaluation.add_argument(
        "--vae", default=None, help="a latent model's VAE folder, if not where its vae.json says it was"
    )
    evaluation.add_argument("--data", required=True, help="held-out shards (.tar, glob or brace pattern)")
    evaluation.add_argument("--clips", type=int, default=16, help="the first N samples of --data")
    evaluation.add_argument(
        "--context-frames", type=int, default=4, help="real frames each rollout starts from"
    )
    evaluation.add_argument("--frames", type=int, default=28, help="frames generated after the context")
    add_sampling_flags(evaluation, "autoregressive, pyramid, sync or teacher (`dforce.diffusion.scheduling`)")
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--batch-size", type=int, default=16, help="clips rolled out at once")
    evaluation.add_argument(
        "--elbo-draws", type=int, default=32, help="states drawn per clip for the ELBO; 0: none"
    )
    evaluation.add_argument(
        "--ode-steps", type=int, default=0, help="Heun steps of the ODE likelihood; 0: none"
    )
    evaluation.add_argument("--ode-probes", type=int, default=4, help="Hutchinson probes per clip")
    evaluation.add_argument(
        "--ode-path",
        default="autoregressive",
        choices=["autoregressive", "sync"],
        help="frames one block at a time given the past, or all together",
    )
    evaluation.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    evaluation.add_argument("--out", default=None, help="output folder (default: eval/ beside the model)")
    evaluation.set_defaults(run=commands.evaluate)

    versus = subcommands.add_parser(
        "compare",
        help="evaluations side by side, with error bars",
        description="Balls found, ball error and MSE per horizon-multiple band (mean ± standard error over "
        "clips) and frames per second of `dforce eval` folders scored on the same clips and seed.",
    )
    versus.add_argument("evals", nargs="+", help="folders written by `dforce eval --out`")
    versus.add_argument("--names", default=None, help="comma-separated row names (default: the folders)")
    versus.add_argument("--out", default=None, help="also write the table to this markdown file")
    versus.set_defaults(run=commands.compare)

    grid = subcommands.add_parser(
        "ablate",
        help="train every trajectory weighting with several seeds, evaluate and tabulate",
        description="Trains CONFIG (with the dotted overrides) once per weighting and seed into "
        "OUT/runs/WEIGHTING/seedS (OUT: the config's output_dir), evaluates every model on the config's "
        "validation.shards (validation.context_frames real frames, then rollout_frames generated) with each "
        "sampling schedule, sampled otherwise as the model's sampling.json says, and writes results.csv, "
        "frames.csv, loss_by_level.csv, results.md (mean +- std "
        "over seeds) and plots. Rerunning resumes: finished runs and evaluations are skipped.",
    )
    grid.add_argument("config", help="YAML training config with a validation section")
    grid.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    grid.add_argument(
        "--weightings",
        default="independent,paths,teacher,sync,schedule:pyramid",
        help="comma-separated trajectory weightings (trajectory.name values)",
    )
    grid.add_argument("--seeds", type=int, default=3, help="runs per weighting, seeds seed, seed+1, ...")
    grid.add_argument(
        "--schedules",
        default="autoregressive,pyramid,sync",
        help="sampling schedules each model is scored with",
    )
    grid.add_argument("--clips", type=int, default=16, help="held-out clips every model is scored on")
    grid.add_argument(
        "--elbo-draws", type=int, default=32, help="states drawn per clip for the ELBO; 0: none"
    )
    grid.add_argument("--out", default=None, help="output folder (default: the config's output_dir)")
    grid.set_defaults(run=commands.ablate)

    export = subcommands.add_parser(
        "export",
        help="a standalone model directory from a run or a released causal Wan checkpoint",
        description="Writes the model of SOURCE (a run's output_dir, whose model/ it reads, or a model "
        "directory) to --out, a new directory that `dforce sample`, `dforce eval` and "
        "self_forcing.teacher/generator read. A LoRA run's adapters stay beside the base weights in "
        "diffusers' pytorch_lora_weights.safetensors (which load_lora_weights reads), or with --merge-lora "
        "are added into the weights: a plain diffusers model that loads without peft. SOURCE may also be a "
        "released causal Wan generator (Self-Forcing's self_forcing_dmd.pt or ode_init.pt, CausVid's), read "
        "as weights only into the config of --base (the Wan 2.1 diffusers folder it was trained from), with "
        "Self-Forcing's sampling recipe (4 renoise steps 1000/750/500/250, shift 5).",
    )
    export.add_argument(
        "source", metavar="SOURCE", help="a run's output_dir, a model directory or a .pt file"
    )
    export.add_argument("--out", required=True, help="the new model directory")
    export.add_argument(
        "--merge-lora", action="store_true", help="add the LoRA adapters into the base weights"
    )
    released = export.add_argument_group("a released checkpoint (SOURCE a .pt file)")
    released.add_argument(
        "--base", default=None, help="its Wan diffusers folder: pipeline root or transformer/"
    )
    released.add_argument("--key", default=None, help="its entry (default generator_ema, else generator)")
    released.add_argument("--num-frames", type=int, default=21, help="latent frames of its horizon")
    released.add_argument("--frames-per-block", type=int, default=3, help="latent frames per causal block")
    released.add_argument("--sample-size", default="60x104", help="latent HxW (480x832 pixels: 60x104)")
    export.set_defaults(run=commands.export)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills `overrides` at the first positional: key=value pairs after options land here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except (ValueError, DforceError) as error:
        sys.exit(f"dforce {args.command}: {error}")


if __name__ == "__main__":
    main()
