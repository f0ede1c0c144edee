"""Shards -> the same shards with their captions' text embeddings (`dforce encode-text`).

Each output sample is its input sample (video or latents, json record) plus `text.npy`: float16 [n, D],
the n token embeddings of the record's `caption` by a `transformers` text encoder (`dforce.data.text`),
without the encoder's padding (the loader pads them to `data.text_length` with zeros and the mask). The record
gains a `text` entry: the encoder folder, the width D, the tokens n and the tokenizer's `max_length`.

Input shard NAME.tar gives OUT/NAME.tar, written as NAME.tar.partial and renamed once complete: a rerun
skips the shards already written (resume), and a killed run leaves no half shard under a name the loader
reads. OUT must not be the input's folder. Samples without a caption are skipped and listed.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from dforce.data.clips import CAPTION, TEXT_FIELD
from dforce.data.reading import count_samples, expand_shards, read_samples
from dforce.data.text import TextEncoder


@dataclass
class TextSummary:
    """What a run read, wrote, kept from an earlier run and skipped, with the reason for each skip."""

    samples: int = 0
    written: int = 0
    shards: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample, reason)

    def __str__(self) -> str:
        lines = [
            f"{self.samples} samples read, {self.written} written with text to {len(self.shards)} shards, "
            f"{len(self.kept)} shards already encoded kept, {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {source}: {reason}" for source, reason in self.skipped]
        return "\n".join(lines)


def _targets(urls: list[str], out: Path) -> dict[str, Path]:
    """Each input shard's output path; ValueError if one would replace an input or two share a name."""
    targets: dict[str, Path] = {}
    for url in urls:
        path = Path(urlparse(url).path)
        target = out / path.name
        if target in targets.values():
            raise ValueError(f"two input shards are named {path.name}; their outputs would collide in {out}")
        if target.resolve() == path.resolve() or path.parent.resolve() == out.resolve():
            raise ValueError(f"--out {out} holds the input shard {url}: write the text shards elsewhere")
        targets[url] = target
    return targets


def _caption(sample: dict) -> tuple[dict, str]:
    """The sample's json record and caption; ValueError with the reason if it has none."""
    record = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(record, dict):
        raise ValueError("the json record is not an object")
    caption = record.get(CAPTION)
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"no {CAPTION} in the json record")
    return record, caption


def _encode_shard(
    url: str,
    target: Path,
    encoder: TextEncoder,
    text_length: int,
    batch_size: int,
    summary: TextSummary,
    bar: tqdm,
) -> None:
    partial = target.with_name(target.name + ".partial")
    info = {"encoder": str(encoder.path), "dim": encoder.dim, "max_length": text_length}
    written = 0
    with wds.TarWriter(str(partial)) as sink:
        pending: list[tuple[dict, dict, str]] = []  # (sample, record, caption)

        def flush() -> None:
            nonlocal written
            tokens = encoder.tokens([caption for _, _, caption in pending], text_length) if pending else []
            for (sample, record, _), embedding in zip(pending, tokens, strict=True):
                buffer = io.BytesIO()
                np.save(buffer, embedding.float().cpu().numpy().astype(np.float16), allow_pickle=False)
                fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                record["text"] = {**info, "tokens": len(embedding)}
                sink.write(
                    {"__key__": sample["__key__"], **fields, TEXT_FIELD: buffer.getvalue(), "json": record}
                )
                written += 1
            pending.clear()

        for sample in read_samples([url]):
            summary.samples += 1
            bar.update()
            try:
                pending.append((sample, *_caption(sample)))
            except (ValueError, UnicodeDecodeError) as reason:
                summary.skipped.append((f"{url}#{sample['__key__']}", str(reason)))
                continue
            if len(pending) == batch_size:
                flush()
        flush()
    if written:
        os.replace(partial, target)
        summary.shards.append(str(target))
        summary.written += written
    else:
        os.remove(partial)


def encode_text(
    shards: str | list[str],
    out: str | Path,
    encoder: str | Path,
    *,
    text_length: int = 512,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = False,
) -> TextSummary:
    """Write OUT/NAME.tar for every input shard NAME.tar not yet there (all of them with `overwrite`): its
    captioned samples with their captions' embeddings, `batch_size` captions per encoder call, each cut to
    `text_length` tokens at most."""
    if text_length < 1 or batch_size < 1:
        raise ValueError(f"text_length and batch_size must be >= 1, got {text_length}, {batch_size}")
    urls = expand_shards(shards)
    out = Path(out)
    targets = _targets(urls, out)
    summary = TextSummary()
    todo = [url for url in urls if overwrite or not targets[url].is_file()]
    summary.kept = [str(targets[url]) for url in urls if url not in todo]
    if not todo:
        return summary
    text_encoder = TextEncoder(encoder, device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    try:
        total = count_samples(todo)
    except ValueError:  # remote shards: no count without reading them
        total = None
    with tqdm(total=total, unit="sample", disable=None if progress else True) as bar:
        for url in todo:
            _encode_shard(url, targets[url], text_encoder, text_length, batch_size, summary, bar)
    return summary
