import pytest
import torch
from conftest import pattern
from conftest import write_video as write_source
from PIL import Image

from dforce.data.decode import decode_video
from dforce.data.loader import to_float
from dforce.data.video import read_clip, side_by_side, to_uint8, write_video


def test_to_uint8_inverts_to_float():
    pixels = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)  # [T, C, H, W]
    assert torch.equal(to_uint8(to_float(pixels)), pixels.permute(0, 2, 3, 1))
    grey = to_uint8(torch.full((2, 1, 3, 3), 2.0))  # clipped, shown as grey
    assert grey.shape == (2, 3, 3, 3) and (grey == 255).all()
    with pytest.raises(ValueError, match="decode latents"):
        to_uint8(torch.zeros(1, 4, 2, 2))


def test_side_by_side_pads_the_real_frames_with_black():
    generated, real = torch.zeros(5, 3, 4, 2), torch.ones(3, 3, 4, 2)
    pair = side_by_side(generated, real)
    assert pair.shape == (5, 3, 4, 4)
    assert (pair[:3, ..., 2:] == 1).all() and (pair[3:, ..., 2:] == -1).all() and (pair[..., :2] == 0).all()
    assert side_by_side(generated[:2], real).shape == (2, 3, 4, 4)


@pytest.mark.parametrize("size", [(16, 8), (5, 7)])
def test_write_video_mp4_and_gif(tmp_path, size):
    frames = torch.from_numpy(pattern(6, *size))  # [T, H, W, 3] uint8
    mp4, gif = write_video(tmp_path / "out/video.mp4", frames, fps=10, scale=2)
    assert gif == tmp_path / "out/video.gif"
    decoded = decode_video(mp4.read_bytes())  # [T, C, H, W]
    assert decoded.shape == (6, 3, 2 * size[0], 2 * size[1])
    upscaled = frames.repeat_interleave(2, 1).repeat_interleave(2, 2).permute(0, 3, 1, 2)
    assert (decoded.float() - upscaled.float()).abs().mean() < 8
    with Image.open(gif) as image:
        assert image.n_frames == 6 and image.size == (2 * size[1], 2 * size[0])
        assert image.info["duration"] == 100  # ms
    with pytest.raises(ValueError, match=r"must be a \.mp4 file"):
        write_video(tmp_path / "video.webm", frames, fps=8)


def test_read_clip_from_a_file_and_from_shards(tmp_path, index_shards):
    source = tmp_path / "clip.mp4"
    write_source(source, pattern(7, 16, 32), fps=12)
    frames, fps = read_clip(source)
    assert frames.shape == (7, 3, 16, 32) and frames.dtype == torch.uint8 and fps == 12
    frames, fps = read_clip(index_shards[1], index=1)
    assert frames.shape == (8, 3, 8, 32)
    with pytest.raises(ValueError, match="fewer than 100 samples"):
        read_clip(index_shards[1], index=99)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"broken\.mp4: unreadable"):
        read_clip(tmp_path / "broken.mp4")
