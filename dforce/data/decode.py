"""Decoding one in-memory video file: decord, with PyAV for the frame widths decord mis-copies."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")


class SkipSample(Exception):
    """A sample that cannot make a clip (unreadable, too short, ...); the message is the reason."""


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
        import decord  # here, so that dforce imports where decord is absent (a bare GPU machine)

        self.data = data
        self.errors = (RuntimeError, decord.DECORDError)
        try:
            with _native_stderr_silenced():
                self.reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        except self.errors as error:
            raise SkipSample(_reason(error)) from error
        self.frames, self.fps = len(self.reader), self.reader.get_avg_fps()

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames as uint8 `[T, C, H, W]`."""
        indices = [int(i) for i in indices]
        try:
            frames = self.reader.get_batch(indices).asnumpy()  # [T, H, W, C]
        except self.errors as error:
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
