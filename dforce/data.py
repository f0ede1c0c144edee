"""Webdataset shards of videos (or latents) -> batches of clips `[B, T, C, H, W]` in [-1, 1].

A shard sample is a video file (`mp4`, `webm`, `mkv`, `avi`, ...) or a `latent.npy` array, next to a
`json` record (`fps`, `label`, per-frame `actions`, ...). `make_loader` gives one rank's batches of
one epoch. Every rank gets the same number of batches (an uneven split hangs DDP), and the order is
a pure function of (seed, epoch, world size, workers), so a resumed run repeats an uninterrupted one.
webdataset expands the shard patterns and reads the tars (any URL it opens); the split over ranks and
workers, the shuffle buffer and the epoch length are done here rather than with `split_by_node`,
`shuffle` and `with_epoch`: those split by torch.distributed's rank, seed from the clock unless told,
count per worker (so ranks can end unevenly), and would decode every skipped sample on resume.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import logging
import math
import os
import sys
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import decord
import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
LATENT_FIELD = "latent.npy"
FRAME_FIELDS = ("actions", "states")  # json arrays with one row per frame, cut like the video

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where clips come from and how they are cut. Plain types only, so that YAML can fill it."""

    shards: str | list[str] = "outputs/data/bouncing_balls/train-*.tar"  # list, glob, brace pattern, URLs
    clip_frames: int = 16
    frame_stride: int = 1  # every n-th frame of the stored video (or latent)
    fps: float | None = None  # resample to this frame rate instead of using frame_stride (videos only)
    clip_start: int | None = None  # first frame of every clip; None draws it uniformly
    size: int | list[int] | None = None  # square side or [height, width]; None keeps the stored size
    crop: str = "center"  # "center" or "random", after scaling the clip to cover `size`
    pixels: str = "float32"  # "float32" in [-1, 1], or "uint8" (4x less to move) for `to_float` on the device
    num_workers: int = 2
    shuffle: bool = True  # shuffle shards and, through a buffer, samples
    shuffle_buffer: int = 256
    resampled: bool = False  # draw each slot's shards with replacement instead of passing over them
    samples_per_epoch: int | None = None  # None counts the samples of local shards
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.clip_frames, self.frame_stride, self.shuffle_buffer) < 1:
            raise ValueError("clip_frames, frame_stride and shuffle_buffer must be >= 1")
        if min(self.num_workers, self.seed) < 0:
            raise ValueError("num_workers and seed must be >= 0")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.pixels not in ("float32", "uint8"):
            raise ValueError(f"pixels must be 'float32' or 'uint8', got {self.pixels!r}")
        if self.size is not None:
            pair = [self.size] * 2 if isinstance(self.size, int) else list(self.size)
            if len(pair) != 2 or min(pair) < 1:
                raise ValueError(f"size must be a positive int or [height, width], got {self.size!r}")


class SkipSample(Exception):
    """A sample that cannot make a clip (unreadable, too short, ...); the message is the reason."""


def parse_size(text: str) -> int | tuple[int, int]:
    """'64' -> 64, '64x96' -> (64, 96) as (height, width)."""
    try:
        values = [int(part) for part in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"bad size {text!r}: expected N or HEIGHTxWIDTH, e.g. 64 or 64x96")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _local_path(url: str) -> str | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return parsed.path
    return url if parsed.scheme == "" else None


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Shard URLs from a list, a glob, or a brace pattern (`train-{000000..000099}.tar`, `a.tar::b.tar`)."""
    urls = []
    for pattern in [shards] if isinstance(shards, str) else shards:
        for url in wds.shardlists.expand_urls(pattern):
            path = _local_path(url)
            if path is not None and any(char in path for char in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise ValueError(f"no shards match {url}")
                urls += matches
            elif path is not None and not os.path.isfile(path):
                raise ValueError(f"shard not found: {url}")
            else:
                urls.append(url)
    if not urls:
        raise ValueError(f"no shards in {shards!r}")
    return list(dict.fromkeys(urls))


@lru_cache(maxsize=65536)
def _count_tar(path: str, mtime_ns: int, size: int) -> int:
    count, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:  # also gzip-compressed shards
            for member in tar:
                key = wds.tariterators.base_plus_ext(member.name)[0]
                if member.isreg() and key is not None and not member.name.startswith("__"):
                    count, last = count + (key != last), key
    except (tarfile.TarError, OSError) as error:
        logger.warning("shard %s is damaged after %d samples: %s", path, count, error)
    return count


def count_samples(urls: Iterable[str]) -> int:
    """Samples in local shards, from the tar headers alone."""
    total = 0
    for url in urls:
        path = _local_path(url)
        if path is None:
            raise ValueError(f"cannot count the samples of remote shard {url}: set samples_per_epoch")
        stat = os.stat(path)
        total += _count_tar(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    return total


def _name_shards(urls: Sequence[str], limit: int = 4) -> str:
    names = ", ".join(urls[:limit])
    return names + (f" and {len(urls) - limit} more" if len(urls) > limit else "")


def _warn_and_continue(error: Exception) -> bool:
    logger.warning("shard read error, going on with the next shard: %s", error)
    return True


def read_samples(shards: str | Iterable[str]) -> Iterator[dict]:
    """Undecoded samples (`{"__key__", "__url__", "mp4": bytes, "json": bytes, ...}`) of shards in order.

    `shards` is a pattern for `expand_shards` or URLs. A damaged shard is logged and left at the damage.
    """
    urls = expand_shards(shards) if isinstance(shards, str) else shards
    return wds.tariterators.tarfile_samples(({"url": url} for url in urls), handler=_warn_and_continue)


def resize_crop(
    video: torch.Tensor,
    size: int | Sequence[int] | None,
    crop: str = "center",
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Scale `[T, C, H, W]` (uint8 or float) to cover `size`, keeping the aspect ratio, then crop to it."""
    if size is None:
        return video
    h, w = (size, size) if isinstance(size, int) else size
    height, width = video.shape[-2:]
    scale = max(h / height, w / width)
    scaled = max(h, round(height * scale)), max(w, round(width * scale))
    if scaled != (height, width):
        video = F.interpolate(video, size=scaled, mode="bilinear", antialias=True, align_corners=False)
    if crop == "random":
        top, left = int(rng.integers(scaled[0] - h + 1)), int(rng.integers(scaled[1] - w + 1))
    else:
        top, left = (scaled[0] - h) // 2, (scaled[1] - w) // 2
    return video[..., top : top + h, left : left + w]


def clip_indices(
    frames: int, clip_frames: int, step: float, start: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Indices of a clip of `clip_frames` frames `step` apart (fractional steps resample the frame rate)."""
    offsets = np.floor(np.arange(clip_frames) * step + 1e-6).astype(np.int64)  # [T]
    span = int(offsets[-1]) + 1
    if frames == 0:
        raise SkipSample("zero frames")
    if start is None:
        if frames < span:
            raise SkipSample(f"too short: {frames} frames, a clip spans {span}")
        start = int(rng.integers(frames - span + 1))
    elif start + span > frames:
        raise SkipSample(f"too short: {frames} frames, a clip from frame {start} spans {span}")
    return start + offsets


def _reason(error: Exception) -> str:
    return f"unreadable: {str(error).strip().splitlines()[0][:200]}"


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """decord logs a file it cannot open to the C-level stderr, with the file's bytes as its name; the
    exception it raises says enough."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Video:
    """An in-memory video file, read with decord (`num_threads=1`: parallelism comes from workers).

    decord mis-copies frames of a few narrow widths (16, 24, 48 px, ...); those are read with PyAV.
    Raises SkipSample with the reason when the file cannot be opened or read.
    """

    def __init__(self, data: bytes):
        self.data = data
        try:
            with _native_stderr_silenced():
                self.reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        except (RuntimeError, decord.DECORDError) as error:
            raise SkipSample(_reason(error)) from error
        self.frames, self.fps = len(self.reader), self.reader.get_avg_fps()

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames as uint8 `[T, C, H, W]`."""
        indices = [int(i) for i in indices]
        try:
            frames = self.reader.get_batch(indices).asnumpy()  # [T, H, W, C]
        except (RuntimeError, decord.DECORDError) as error:
            if "DECORDArrayCopyFromTo" not in str(error):
                raise SkipSample(_reason(error)) from error
            frames = self._read_with_av(indices)
        return torch.from_numpy(frames).permute(0, 3, 1, 2)  # [T, C, H, W]

    def _read_with_av(self, indices: list[int]) -> np.ndarray:
        import av

        wanted, found = set(indices), {}
        try:
            with av.open(io.BytesIO(self.data)) as container:
                for i, frame in enumerate(container.decode(video=0)):  # presentation order, like decord
                    if i in wanted:
                        found[i] = frame.to_ndarray(format="rgb24")
                    if len(found) == len(wanted):
                        break
        except av.FFmpegError as error:
            raise SkipSample(_reason(error)) from error
        if len(found) < len(wanted):
            raise SkipSample(f"unreadable: frame {max(wanted - found.keys())} does not decode")
        return np.stack([found[i] for i in indices])  # [T, H, W, C]


def decode_video(data: bytes) -> torch.Tensor:
    """All frames of an in-memory video file as uint8 `[T, C, H, W]`."""
    video = Video(data)
    if video.frames == 0:
        raise SkipSample("zero frames")
    return video.read(range(video.frames))


def _video_clip(data: bytes, config: DataConfig, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    video = Video(data)
    if config.fps is not None and not video.fps > 0:
        raise SkipSample("unknown frame rate, cannot resample to data.fps")
    step = video.fps / config.fps if config.fps is not None else config.frame_stride
    indices = clip_indices(video.frames, config.clip_frames, step, config.clip_start, rng)
    return resize_crop(video.read(indices), config.size, config.crop, rng), indices  # [T, C, H, W] uint8


def _latent_clip(
    data: bytes, record: dict, config: DataConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    try:
        latent = np.load(io.BytesIO(data), allow_pickle=False)  # [N, C, h, w]
    except (ValueError, OSError, EOFError) as error:
        raise SkipSample(f"unreadable latent: {error}") from error
    if latent.ndim != 4:
        raise SkipSample(f"latent has shape {latent.shape}, expected [frames, channels, height, width]")
    indices = clip_indices(len(latent), config.clip_frames, config.frame_stride, config.clip_start, rng)
    clip = torch.from_numpy(latent[indices].astype(np.float32))  # [T, C, h, w]
    info = record.get("latent", {})
    if info.get("latents_mean") is not None:  # per-channel statistics (Wan-style autoencoders)
        mean, std = (torch.tensor(info[key], dtype=torch.float32) for key in ("latents_mean", "latents_std"))
        if mean.shape != std.shape or len(mean) != clip.shape[1]:
            raise SkipSample(
                f"latents_mean/std have {len(mean)}/{len(std)} entries for {clip.shape[1]} channels"
            )
        return (clip - mean.view(-1, 1, 1)) / std.view(-1, 1, 1), indices
    return (clip - info.get("shift_factor", 0.0)) * info.get("scaling_factor", 1.0), indices


def decode_sample(sample: dict, config: DataConfig, rng: np.random.Generator) -> dict:
    """One clip: `video` `[T, C, H, W]` (uint8 pixels, or float scaled latents), `label`, `actions`
    `[T, A]`, `states` `[T, ...]` when the record has them. Raises SkipSample with the reason if it cannot."""
    try:
        record = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError) as error:
        raise SkipSample(f"bad json record: {error}") from error
    if not isinstance(record, dict):
        raise SkipSample("the json record is not an object")
    if LATENT_FIELD in sample:
        clip, indices = _latent_clip(sample[LATENT_FIELD], record, config, rng)
    else:
        field = next((ext for ext in VIDEO_EXTENSIONS if ext in sample), None)
        if field is None:
            raise SkipSample(
                f"no video ({', '.join(VIDEO_EXTENSIONS)}) or {LATENT_FIELD} in fields {sorted(sample)}"
            )
        clip, indices = _video_clip(sample[field], config, rng)
    out = {"video": clip, "key": sample["__key__"], "latent": LATENT_FIELD in sample}
    label = record.get("label")
    if isinstance(label, int) and not isinstance(label, bool):
        out["label"] = torch.tensor(label)
    for name in FRAME_FIELDS:
        if name in record:
            try:
                rows = np.asarray(record[name], dtype=np.float32)  # [N, ...]
            except ValueError as error:
                raise SkipSample(f"{name} is not a numeric array: {error}") from error
            if rows.ndim == 0 or len(rows) <= indices[-1]:
                raise SkipSample(
                    f"{name} has {len(rows) if rows.ndim else 0} rows, the clip needs frame {indices[-1]}"
                )
            out[name] = torch.from_numpy(rows[indices])  # [T, ...]
    return out


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch buffer; in a DataLoader worker it lies in shared memory, so handing it over copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def to_float(video: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) -> contiguous float in [-1, 1], on the tensor's device (x / 127.5 - 1 maps
    0 and 255 to -1 and 1 exactly); float tensors pass through."""
    if video.dtype != torch.uint8:
        return video
    return video.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1)


def collate(clips: list[dict], skipped: int = 0, pixels: str = "float32") -> dict:
    """Stack clips into a batch; `label`, `actions`, `states` only when every clip has them.

    Pixels become contiguous float in [-1, 1] in the same pass, or, with `pixels="uint8"`, stay uint8 in
    the decoder's channels-last memory order (`[B, T, C, H, W]` viewed over `[B, T, H, W, C]`: no
    transposing copy on the CPU; `to_float` on the device makes them contiguous).
    """
    kinds = {(tuple(clip["video"].shape), clip["video"].dtype) for clip in clips}
    if len(kinds) > 1:
        raise ValueError(
            f"clips differ in shape or type {sorted(map(str, kinds))}: set data.size to resize them"
        )
    first = clips[0]["video"]
    shape = (len(clips), *first.shape)  # [B, T, C, H, W]
    if first.dtype != torch.uint8:  # latents
        video = torch.stack([clip["video"] for clip in clips], out=_empty(shape, first.dtype))
    elif pixels == "uint8":
        b, t, c, h, w = shape
        video = _empty((b, t, h, w, c), torch.uint8).permute(0, 1, 4, 2, 3)
        for i, clip in enumerate(clips):
            video[i].copy_(clip["video"])
    else:
        video = _empty(shape, torch.float32)
        for i, clip in enumerate(clips):  # x / 127.5 - 1 maps 0 and 255 to -1 and 1 exactly
            video[i].copy_(clip["video"]).div_(127.5).sub_(1)  # one strided copy, then in place
    batch = {
        "video": video,
        "key": [clip["key"] for clip in clips],
        "latent": clips[0]["latent"],
        "skipped": skipped,
    }
    for name in ("label", *FRAME_FIELDS):
        if all(name in clip for clip in clips):
            try:
                batch[name] = torch.stack([clip[name] for clip in clips])  # [B] or [B, T, ...]
            except RuntimeError as error:
                raise ValueError(
                    f"{name} differ in shape within a batch of {batch['key']}: {error}"
                ) from error
    return batch


def _rng(*seed: int) -> np.random.Generator:
    return np.random.default_rng(list(seed))


class _Lookahead:
    """An iterator that can look at items ahead without consuming them."""

    def __init__(self, items: Iterator):
        self.items, self.ahead = items, deque()

    def __next__(self):
        return self.ahead.popleft() if self.ahead else next(self.items)

    def peek(self, i: int):
        while len(self.ahead) <= i:
            self.ahead.append(next(self.items))
        return self.ahead[i]


class ClipDataset(IterableDataset):
    """The batches of one rank in one epoch; DataLoader worker `w` makes the batches `w, w + W, ...`.

    Shards are split over the `world_size * num_workers` (rank, worker) slots; with fewer shards than
    slots every slot reads all of them and keeps every slots-th sample. A slot reads its shards over and
    over (a new order each pass, samples shuffled within a pass) until it has made its batches, so each
    rank makes exactly `samples_per_epoch // (world_size * batch_size)` of them. Batch `i` is made from
    raw samples `i*B .. i*B+B-1` of its slot's stream; a sample that fails to decode is replaced by a
    copy of another clip of the same batch and counted in `batch["skipped"]`. Skipping the first `start`
    batches of a resumed epoch thus only reads the tar files, and decodes nothing.
    """

    def __init__(
        self,
        config: DataConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        start: int = 0,
    ):
        super().__init__()
        if not 0 <= rank < world_size or epoch < 0 or batch_size < 1:
            raise ValueError(
                f"need 0 <= rank < world_size, epoch >= 0 and batch_size >= 1, "
                f"got {rank}, {world_size}, {epoch}, {batch_size}"
            )
        self.config, self.batch_size, self.rank, self.world_size = config, batch_size, rank, world_size
        self.epoch, self.start = epoch, start
        self.urls = expand_shards(config.shards)
        self.samples = config.samples_per_epoch or count_samples(self.urls)
        if self.samples == 0:
            raise ValueError(f"no samples in the shards {_name_shards(self.urls)}")
        self.batches = self.samples // (world_size * batch_size)
        if self.batches == 0:
            raise ValueError(
                f"{self.samples} samples make no batch of {batch_size} on each of {world_size} ranks"
            )
        if not 0 <= start <= self.batches:
            raise ValueError(f"start {start} is outside the epoch of {self.batches} batches")

    def __len__(self) -> int:
        return self.batches - self.start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from workers 0, 1, .. in turn; on resume, worker 0 plays the
        # worker whose turn was next, so the batch order is the uninterrupted one.
        role = (worker + self.start) % workers
        done = self.start // workers + (role < self.start % workers)
        total = self.batches // workers + (role < self.batches % workers)
        yield from self._batches(self.rank * workers + role, self.world_size * workers, done, total - done)

    def _slot_samples(self, slot: int, slots: int) -> Iterator[dict]:
        """Undecoded samples of one slot, without end."""
        config = self.config
        urls, by_shard = list(self.urls), len(self.urls) >= slots
        if config.shuffle:
            urls = [urls[i] for i in _rng(config.seed, self.epoch).permutation(len(urls))]
        if by_shard:
            urls = urls[slot::slots]
        # Without a shard split, every slot must read the same stream: its order ignores the slot.
        order_rng = _rng(config.seed, self.epoch, 1, slot if by_shard else slots)
        buffer_rng = _rng(config.seed, self.epoch, 2, slot)
        buffer_size = config.shuffle_buffer if config.shuffle else 1
        index = itertools.count()  # position in the stream shared by all slots
        while True:
            if config.resampled:
                order = [urls[i] for i in order_rng.integers(len(urls), size=len(urls))]
            elif config.shuffle:
                order = [urls[i] for i in order_rng.permutation(len(urls))]
            else:
                order = urls
            read, buffer = 0, []
            for sample in read_samples(order):
                read += 1
                if not by_shard and next(index) % slots != slot:
                    continue
                buffer.append(sample)
                if len(buffer) >= buffer_size:
                    i = buffer_rng.integers(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
            if read == 0:
                raise ValueError(f"no readable samples in the shards {_name_shards(order)}")
            if config.shuffle:
                buffer_rng.shuffle(buffer)
            yield from buffer

    def _decode(self, slot: int, index: int, sample: dict, log: bool = True) -> dict | None:
        try:
            return decode_sample(sample, self.config, _rng(self.config.seed, self.epoch, 3, slot, index))
        except SkipSample as reason:
            if log:
                logger.warning(
                    "skipped sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), reason
                )
            return None

    def _batches(self, slot: int, slots: int, done: int, count: int) -> Iterator[dict]:
        size = self.batch_size
        samples = _Lookahead(enumerate(self._slot_samples(slot, slots)))
        for _ in range(done * size):
            next(samples)
        for _ in range(count):
            decoded = [self._decode(slot, *next(samples)) for _ in range(size)]
            clips = [clip for clip in decoded if clip is not None]
            skipped = size - len(clips)
            if not clips:  # borrow the next good clip, without consuming it, so positions stay put
                clips = [self._next_good(samples, slot)]
            yield collate([clips[i % len(clips)] for i in range(size)], skipped, self.config.pixels)

    def _next_good(self, samples: _Lookahead, slot: int) -> dict:
        for i in range(max(self.samples, 1)):
            clip = self._decode(slot, *samples.peek(i), log=False)
            if clip is not None:
                return clip
        raise ValueError(f"no decodable sample among {self.samples} in a row in {_name_shards(self.urls)}")


def make_loader(
    config: DataConfig,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches of one epoch on one rank (`start` = batches this rank already consumed in the epoch).

    Each batch is a dict: `video` `[B, T, C, H, W]` (float in [-1, 1]; uint8 with `pixels="uint8"`,
    for `to_float` on the device; scaled latents when `latent`), `key` (sample keys), `latent` (bool),
    `skipped` (bad samples replaced in this batch: sum it for the training log), and `label` `[B]`
    long, `actions` `[B, T, A]`, `states` `[B, T, ...]` when every record has them. Do not pass the
    loader through `accelerator.prepare`: it splits the data itself, and Accelerate would drop samples.
    """
    dataset = ClipDataset(config, batch_size, rank, world_size, epoch, start)
    workers = config.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
    )
