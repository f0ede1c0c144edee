"""Reading shards: patterns to URLs, sample counts from tar headers, undecoded samples in order.

webdataset expands the patterns and reads the tars (any URL it opens); a damaged shard is logged and read
up to the damage, so one bad file never stops a run.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from urllib.parse import urlparse

import webdataset as wds

logger = logging.getLogger(__name__)


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


def name_shards(urls: Sequence[str], limit: int = 4) -> str:
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
