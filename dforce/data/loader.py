"""Webdataset shards of videos (or latents) -> batches of clips `[B, T, C, H, W]` in [-1, 1].

`make_loader` gives one rank's batches of one epoch. Every rank gets the same number of batches (an
uneven split hangs DDP), and the order is a pure function of (seed, epoch, world size, workers), so a
resumed run repeats an uninterrupted one. The split over ranks and workers, the shuffle buffer and the
epoch length are done here rather than with webdataset's `split_by_node`, `shuffle` and `with_epoch`:
those split by torch.distributed's rank, seed from the clock unless told, count per worker (so ranks can
end unevenly), and would decode every skipped sample on resume. Reading the tars is `dforce.data.reading`;
cutting one sample into a clip, `dforce.data.clips`; `probe_shards` checks what shards hold before a run.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import tarfile
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dforce.data.clips import (
    CAPTION,
    FRAME_FIELDS,
    LATENT_FIELD,
    TEXT_FIELD,
    DataConfig,
    check_latent_config,
    decode_sample,
    latent_space,
)
from dforce.data.decode import SkipSample
from dforce.data.latents import LatentSpace
from dforce.data.reading import count_samples, expand_shards, name_shards, read_samples
from dforce.data.text import TEXT_KEYS

logger = logging.getLogger(__name__)


def _first_sample(path: str) -> dict[str, bytes | None]:
    """The fields of a tar's first sample: the json record's bytes, the other fields' names only."""
    fields, first = {}, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if not member.isreg() or key is None or member.name.startswith("__"):
                    continue
                if first is not None and key != first:
                    break
                first, fields[ext] = key, tar.extractfile(member).read() if ext == "json" else None
    except (tarfile.TarError, OSError) as error:
        logger.warning("shard %s is unreadable at its first sample: %s", path, error)
    return fields


def _first_samples(data: DataConfig) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(url, its first sample's fields) of every local shard that has a sample; remote ones are not read."""
    for url in expand_shards(data.shards):
        path = urlparse(url).path if url.startswith("file:") else url
        fields = _first_sample(path) if os.path.isfile(path) else {}
        if fields:
            yield url, fields


def probe_shards(data: DataConfig) -> LatentSpace | None:
    """The `LatentSpace` of latent shards, or None for video shards, from the first sample of each local
    shard (remote ones are not read), so that a run can refuse its data before it builds anything.

    ValueError naming the files if videos and latents mix, if two shards hold latents of different
    autoencoders, or if `data` asks what latents cannot do (`clips.check_latent_config`).
    """
    videos, latents, space, source = [], [], None, None
    for url, fields in _first_samples(data):
        if LATENT_FIELD not in fields:
            videos.append(url)
            continue
        latents.append(url)
        try:
            record = json.loads(fields.get("json") or b"{}")
            found = latent_space(record if isinstance(record, dict) else {})
        except ValueError as error:
            raise ValueError(f"{url}: {error}") from None
        if space is None:
            space, source = found, url
        elif difference := space.mismatch(found):
            raise ValueError(f"{source} and {url} hold latents of different autoencoders: {difference}")
    if videos and latents:
        raise ValueError(f"shards mix videos ({name_shards(videos)}) and latents ({name_shards(latents)})")
    if space is not None:
        check_latent_config(data, space)
    return space


def check_text(data: DataConfig, text_dim: int) -> None:
    """ValueError naming the shards and what they lack unless the first sample of every local shard holds
    text embeddings (`text.npy`) of width `text_dim` that fit in `data.text_length`, so that a model that
    reads text refuses its data before it trains (remote shards are not read)."""
    missing, captioned = [], []
    for url, fields in _first_samples(data):
        try:
            record = json.loads(fields.get("json") or b"{}")
        except ValueError:
            record = {}
        record = record if isinstance(record, dict) else {}
        if TEXT_FIELD not in fields:
            (captioned if CAPTION in record else missing).append(url)
            continue
        info = record.get("text") if isinstance(record.get("text"), dict) else {}
        if info.get("dim", text_dim) != text_dim:
            raise ValueError(
                f"{url} holds text embeddings of width {info['dim']}; the model reads {text_dim}"
            )
        if info.get("max_length", 0) > data.text_length:
            raise ValueError(
                f"{url} holds text of up to {info['max_length']} tokens, more than data.text_length="
                f"{data.text_length}: raise data.text_length or encode the text shorter"
            )
    if missing or captioned:
        first = (
            f"give the videos a {CAPTION} (sidecar json key or labels CSV column), then " if missing else ""
        )
        keys = " and ".join(TEXT_KEYS)
        raise ValueError(
            f"{name_shards(missing + captioned)} hold no {TEXT_FIELD} (a caption's {keys}), which the model "
            f"(text_dim={text_dim}) reads: {first}run dforce encode-text"
        )


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
    """Stack clips into a batch; `label`, `actions`, `states` and the text only when every clip has them.

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
    for name in ("label", *FRAME_FIELDS, *TEXT_KEYS):
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
            raise ValueError(f"no samples in the shards {name_shards(self.urls)}")
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
                raise ValueError(f"no readable samples in the shards {name_shards(order)}")
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
        raise ValueError(f"no decodable sample among {self.samples} in a row in {name_shards(self.urls)}")


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
    for `to_float` on the device; normalized latents when `latent`), `key` (sample keys), `latent` (bool),
    `skipped` (bad samples replaced in this batch: sum it for the training log), and `label` `[B]`
    long, `actions` `[B, T, A]`, `states` `[B, T, ...]` when every record has them, and the text
    `encoder_hidden_states` `[B, L, D]` (zero after each clip's tokens), `encoder_attention_mask` `[B, L]`
    bool (L = `text_length`) when every sample holds `text.npy`. Do not pass the
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
