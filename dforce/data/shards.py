"""Writing webdataset shards: video files (`make_shards`) and anything else through `ShardSink`.

Every sample is read, checked and encoded in memory before it is written, and each shard is written
as `NAME.tar.partial` and renamed to `NAME.tar` when complete: a bad input is skipped with its reason,
and a killed run leaves no half-written shard under a name the loader reads.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from dforce.data.clips import CAPTION, FRAME_FIELDS, resize_crop
from dforce.data.decode import VIDEO_EXTENSIONS, SkipSample, Video

VIDEO_SUFFIXES = tuple(f".{ext}" for ext in VIDEO_EXTENSIONS)  # what a folder search picks up
CHUNK_FRAMES = 64  # frames decoded at a time while checking or re-encoding a whole video


def encode_video(
    frames: torch.Tensor | np.ndarray | Iterator, fps: float, crf: int = 12, pix_fmt: str = "yuv444p"
) -> bytes:
    """H.264 mp4 bytes of uint8 frames `[T, H, W, 3]` (or an iterator of such chunks).

    `yuv444p` keeps full colour resolution and takes any size; `yuv420p` plays everywhere but needs
    even sizes. crf 0 is lossless up to the RGB -> YUV rounding.
    """
    import av

    chunks = [frames] if isinstance(frames, torch.Tensor | np.ndarray) else frames
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = None
        for chunk in chunks:
            for frame in np.asarray(chunk, dtype=np.uint8):
                if stream is None:
                    height, width = frame.shape[:2]
                    if pix_fmt == "yuv420p" and (height % 2 or width % 2):
                        raise ValueError(f"yuv420p needs an even size, got {height}x{width}: use yuv444p")
                    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                    stream.height, stream.width, stream.pix_fmt = height, width, pix_fmt
                    stream.options = {"crf": str(crf)}
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is None:
            raise ValueError("no frames to encode")
        container.mux(stream.encode())
    return buffer.getvalue()


class ShardSink:
    """`webdataset.ShardWriter` into `out_dir/PREFIX-%06d.tar`, each shard renamed there once complete.

    Opens the first shard at the first sample, so an empty run writes nothing. Refuses to mix with
    shards of an earlier run of the same prefix unless `overwrite`, which deletes them (and any
    `.tar.partial` a killed run left) first.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "train",
        maxcount: int = 1000,
        maxsize: float = 1e9,
        overwrite: bool = False,
    ):
        if maxcount < 1:  # webdataset would begin with an empty shard
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.options = {"maxcount": maxcount, "maxsize": maxsize}
        old = sorted(glob.glob(str(self.out_dir / f"{glob.escape(prefix)}-[0-9]*.tar")))
        if old and not overwrite:
            raise ValueError(f"{out_dir} already holds {len(old)} {prefix}-*.tar shards: pass --overwrite")
        if overwrite:  # with the pieces a killed run left
            old += glob.glob(str(self.out_dir / f"{glob.escape(prefix)}-[0-9]*.tar.partial"))
        for path in old:
            os.remove(path)
        self.shards: list[str] = []
        self.writer = None

    def _finish(self, partial: str) -> None:
        final = partial.removesuffix(".partial")
        os.replace(partial, final)
        self.shards.append(final)

    def write(self, sample: dict) -> None:
        if self.writer is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            pattern = str(self.out_dir / f"{self.prefix}-%06d.tar.partial")
            self.writer = wds.ShardWriter(pattern, post=self._finish, verbose=0, **self.options)
        self.writer.write(sample)

    def close(self) -> list[str]:
        """Complete the last shard; the list of shards written."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return self.shards

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ShardSummary:
    """What a run read, wrote and skipped, with the reason for each skip."""

    videos: int = 0
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)

    def __str__(self) -> str:
        lines = [
            f"{self.videos} videos read, {self.samples} samples written to {len(self.shards)} shards, "
            f"{len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {source}: {reason}" for source, reason in self.skipped]
        return "\n".join(lines)


def find_videos(inputs: Sequence[str | Path]) -> list[Path]:
    """Video files among `inputs`: files as given, folders searched recursively by suffix."""
    videos = []
    for item in map(Path, inputs):
        if item.is_dir():
            videos += sorted(p for p in item.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        elif item.is_file():
            videos.append(item)
        else:
            raise ValueError(f"no such file or folder: {item}")
    return list(dict.fromkeys(videos))


def read_labels(path: str | Path) -> dict[Path, dict]:
    """A CSV with a header `path,label[,more columns]` -> {resolved video path: {"label": ..., ...}}.

    Paths are relative to the CSV's folder; integer labels become ints, other columns (a `caption`)
    stay strings.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such labels file: {path}")
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: the header must name a 'path' column, got {reader.fieldnames}")
        rows = {}
        for line, row in enumerate(reader, 2):
            if not row.get("path"):
                raise ValueError(f"{path}, line {line}: no path")
            video = (path.parent / row.pop("path")).resolve()
            rows[video] = {
                k: int(v) if k == "label" and re.fullmatch(r"-?\d+", v or "") else v for k, v in row.items()
            }
    return rows


def _sidecar(video: Path, labels: dict[Path, dict]) -> dict:
    """Extra record fields for a video: its CSV row, then `VIDEO_STEM.json` next to it. A `caption` is
    text (an empty one, a blank CSV cell, is none)."""
    extra = dict(labels.get(video.resolve(), {}))
    sidecar = video.with_suffix(".json")
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text())
        except ValueError as error:
            raise SkipSample(f"bad sidecar {sidecar.name}: {error}") from error
        if not isinstance(data, dict):
            raise SkipSample(f"sidecar {sidecar.name} is not a json object")
        extra.update(data)
    if CAPTION in extra:
        if not isinstance(extra[CAPTION], str):
            raise SkipSample(f"{CAPTION} is {type(extra[CAPTION]).__name__}, not text")
        if not extra[CAPTION].strip():
            del extra[CAPTION]
    return extra


def _key(count: int, video: Path) -> str:
    # webdataset splits a file name at its first dot, so the key has none.
    return f"{count:07d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', video.stem)[:48]}"


def _target_size(
    height: int, width: int, size: int | tuple[int, int] | None, pix_fmt: str
) -> tuple[int, int]:
    if size is None:
        return height, width
    if not isinstance(size, int):
        return size
    scale = size / min(height, width)
    if pix_fmt == "yuv420p":  # keep the aspect ratio, rounded to the even sizes 4:2:0 needs
        return max(2, 2 * round(height * scale / 2)), max(2, 2 * round(width * scale / 2))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _check_frame_fields(extra: dict, frames: int) -> None:
    for name in FRAME_FIELDS:
        if name in extra and (not isinstance(extra[name], list) or len(extra[name]) != frames):
            rows = len(extra[name]) if isinstance(extra[name], list) else "no"
            raise SkipSample(f"sidecar {name} has {rows} rows for {frames} frames")


def _video_samples(
    path: Path,
    data: bytes,
    extra: dict,
    *,
    clip_frames: int | None,
    stride: int | None,
    size: int | tuple[int, int] | None,
    reencode: bool,
    crf: int,
    pix_fmt: str,
) -> list[dict]:
    """The samples of one video file, fully decoded and encoded in memory; raises SkipSample."""
    if not data:
        raise SkipSample("empty file")
    video = Video(data)
    if video.frames == 0:
        raise SkipSample("zero frames")
    _check_frame_fields(extra, video.frames)
    height, width = video.read([0]).shape[-2:]
    target = _target_size(height, width, size, pix_fmt)
    encode = clip_frames is not None or reencode or target != (height, width)
    if encode and pix_fmt == "yuv420p" and (target[0] % 2 or target[1] % 2):
        raise SkipSample(f"{target[0]}x{target[1]} is odd, and yuv420p needs even sizes: use yuv444p")

    def frames_of(indices: Sequence[int]) -> Iterator[torch.Tensor]:
        for i in range(0, len(indices), CHUNK_FRAMES):
            chunk = video.read(indices[i : i + CHUNK_FRAMES])  # [t, C, H, W] uint8
            yield resize_crop(chunk, target).permute(0, 2, 3, 1)  # [t, h, w, C]

    record = {"source": str(path), "fps": video.fps, "source_frames": video.frames}
    record.update(height=target[0], width=target[1])
    if clip_frames is None:
        if encode:
            body, ext = encode_video(frames_of(range(video.frames)), video.fps, crf, pix_fmt), "mp4"
        else:  # keep the file as it is, once every frame is known to decode
            for _ in frames_of(range(video.frames)):
                pass
            body, ext = data, path.suffix.lower().lstrip(".")
        return [{ext: body, "json": {**extra, **record, "frames": video.frames, "clip_start": 0}}]
    starts = range(0, video.frames - clip_frames + 1, stride or clip_frames)
    if not starts:
        raise SkipSample(f"too short: {video.frames} frames, a clip has {clip_frames}")
    samples = []
    for start in starts:
        clip_extra = {k: v[start : start + clip_frames] if k in FRAME_FIELDS else v for k, v in extra.items()}
        body = encode_video(frames_of(range(start, start + clip_frames)), video.fps, crf, pix_fmt)
        samples.append(
            {"mp4": body, "json": {**clip_extra, **record, "frames": clip_frames, "clip_start": start}}
        )
    return samples


def make_shards(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    clip_frames: int | None = None,
    stride: int | None = None,
    size: int | tuple[int, int] | None = None,
    reencode: bool = False,
    crf: int = 12,
    pix_fmt: str = "yuv444p",
    labels: str | Path | None = None,
    prefix: str = "train",
    maxcount: int = 1000,
    maxsize: float = 1e9,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardSummary:
    """Video files and folders -> webdataset shards, one sample per video or per clip.

    With `clip_frames`, every video gives the clips starting at frames 0, stride, 2*stride, ..
    (stride defaults to clip_frames). Clips, a `size` (int: short side; (h, w): scale to cover and
    centre-crop) or `reencode` encode H.264 mp4; otherwise the file is stored as it is.
    """
    if any(value is not None and value < 1 for value in (clip_frames, stride)):
        raise ValueError("clip_frames and stride must be >= 1")
    if stride is not None and clip_frames is None:
        raise ValueError("stride needs clip_frames")
    if pix_fmt not in ("yuv444p", "yuv420p"):
        raise ValueError(f"pix_fmt must be yuv444p or yuv420p, got {pix_fmt}")
    if pix_fmt == "yuv420p" and isinstance(size, tuple) and (size[0] % 2 or size[1] % 2):
        raise ValueError(f"yuv420p needs an even size, got {size[0]}x{size[1]}: use yuv444p")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51, got {crf}")
    videos = find_videos(inputs)
    table = read_labels(labels) if labels is not None else {}
    options = dict(
        clip_frames=clip_frames, stride=stride, size=size, reencode=reencode, crf=crf, pix_fmt=pix_fmt
    )
    summary = ShardSummary()
    with ShardSink(out, prefix, maxcount, maxsize, overwrite) as sink:
        bar = tqdm(videos, unit="video", disable=None if progress else True)
        for video in bar:
            summary.videos += 1
            try:
                samples = _video_samples(video, video.read_bytes(), _sidecar(video, table), **options)
            except (SkipSample, OSError) as reason:
                summary.skipped.append((str(video), str(reason)))
                continue
            for sample in samples:
                sink.write({"__key__": _key(summary.samples, video), **sample})
                summary.samples += 1
            bar.set_postfix(samples=summary.samples, skipped=len(summary.skipped))
    summary.shards = sink.shards
    return summary
