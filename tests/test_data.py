import io
import logging

import numpy as np
import pytest
import torch
from conftest import pattern, write_index_shards

from dforce.data.clips import DataConfig, clip_indices, resize_crop
from dforce.data.decode import SkipSample, Video
from dforce.data.latents import LatentSpace
from dforce.data.loader import check_text, make_loader, to_float
from dforce.data.reading import expand_shards
from dforce.data.shards import ShardSink, encode_video


def config(shards, **options) -> DataConfig:
    defaults = dict(shards=shards, clip_frames=4, num_workers=0, shuffle_buffer=4, size=None)
    return DataConfig(**{**defaults, **options})


def loader(cfg: DataConfig, batch_size: int = 2, **where):
    return make_loader(cfg, batch_size=batch_size, **where)


def labels(cfg: DataConfig, batch_size: int = 2, **where) -> list[list[int]]:
    """The sample numbers of each batch."""
    return [batch["label"].tolist() for batch in loader(cfg, batch_size, **where)]


def flat(batches) -> list[int]:
    return [n for batch in batches for n in batch]


def test_batches_hold_clips_and_frame_fields(index_shards):
    batch = next(iter(loader(config(index_shards), 3)))
    assert batch["video"].shape == (3, 4, 3, 8, 32) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert batch["label"].dtype == torch.long and batch["actions"].shape == (3, 4, 1)
    assert batch["skipped"] == 0 and not batch["latent"] and len(batch["key"]) == 3
    start = batch["actions"][:, 0, 0]
    assert (batch["actions"][..., 0] == start[:, None] + torch.arange(4)).all()  # consecutive frames
    assert set(start.tolist()) <= set(range(5))  # random starts in 0..8-4


def test_uint8_pixels_are_the_same_clips(index_shards):
    as_float = next(iter(loader(config(index_shards, num_workers=2))))
    as_uint8 = next(iter(loader(config(index_shards, num_workers=2, pixels="uint8"))))
    assert as_uint8["video"].dtype == torch.uint8 and as_uint8["video"].shape == as_float["video"].shape
    video = to_float(as_uint8["video"])
    assert video.is_contiguous() and torch.equal(video, as_float["video"])
    assert to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_two_ranks_by_two_workers_see_disjoint_samples(index_shards):
    cfg = config(index_shards, num_workers=2)
    ranks = [labels(cfg, rank=rank, world_size=2) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [6, 6]  # 24 samples / (2 ranks x batch 2)
    seen = [flat(batches) for batches in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))  # each slot reads its 2 shards once


@pytest.mark.parametrize("world_size, workers", [(2, 2), (3, 1), (4, 2)])
def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path, world_size, workers):
    one = write_index_shards(tmp_path / "one", shards=1, per_shard=13)  # fewer shards than slots
    three = write_index_shards(tmp_path / "three", shards=3, per_shard=4)
    for data, total in [(one, 13), (three, 12), ([*three, *one], 25)]:
        cfg = config(data, num_workers=workers)
        counts = [len(labels(cfg, rank=rank, world_size=world_size)) for rank in range(world_size)]
        assert counts == [total // (world_size * 2)] * world_size
        assert [len(loader(cfg, rank=rank, world_size=world_size)) for rank in range(world_size)] == counts


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    shards = write_index_shards(tmp_path, shards=1, per_shard=16)
    cfg = config(shards, num_workers=2)
    seen = [flat(labels(cfg, rank=rank, world_size=2)) for rank in range(2)]
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_same_seed_same_order(index_shards):
    cfg = config(index_shards, num_workers=2, shuffle_buffer=5)
    first = labels(cfg, rank=1, world_size=2)
    assert labels(cfg, rank=1, world_size=2) == first
    assert (
        labels(config(index_shards, num_workers=2, shuffle_buffer=5, seed=1), rank=1, world_size=2) != first
    )
    assert labels(cfg, rank=1, world_size=2, epoch=1) != first
    assert sorted(flat(labels(cfg, rank=1, world_size=2, epoch=1))) != sorted(flat(first))  # shards move
    unshuffled = labels(config(index_shards, shuffle=False), world_size=2)
    assert flat(unshuffled) == [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20]  # shards 0, 2, 4, 6 in order


def test_clip_content_is_deterministic(index_shards):
    cfg = config(index_shards, num_workers=2, crop="random", size=6)
    first, again = (list(loader(cfg)) for _ in range(2))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["actions"], b["actions"])


@pytest.mark.parametrize("start", [1, 3, 4])
def test_resume_continues_the_epoch(index_shards, start):
    cfg = config(index_shards, num_workers=2, shuffle_buffer=5)
    full = list(loader(cfg, rank=1, world_size=2, epoch=2))
    resumed = loader(cfg, rank=1, world_size=2, epoch=2, start=start)
    assert len(resumed) == len(full) - start
    rest = list(resumed)
    assert [b["label"].tolist() for b in rest] == [b["label"].tolist() for b in full[start:]]
    for a, b in zip(rest, full[start:], strict=True):
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["actions"], b["actions"])
    with pytest.raises(ValueError, match="outside the epoch"):
        loader(cfg, rank=1, world_size=2, start=len(full) + 1)


def test_resampled_mode(index_shards, tmp_path):
    cfg = config(index_shards, num_workers=2, resampled=True)
    first = [labels(cfg, rank=rank, world_size=2) for rank in range(2)]
    assert [len(batches) for batches in first] == [6, 6]
    assert [labels(cfg, rank=rank, world_size=2) for rank in range(2)] == first
    one = write_index_shards(tmp_path, shards=1, per_shard=8)  # fewer shards than slots: still disjoint
    seen = [flat(labels(config(one, num_workers=2, resampled=True), rank=r, world_size=2)) for r in range(2)]
    assert not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize(
    "options, first, step",
    [
        ({"frame_stride": 2}, None, 2),
        ({"clip_start": 3}, 3, 1),
        ({"fps": 4.0}, None, 2),
        ({"fps": 16.0}, None, 0.5),
    ],
)
def test_frame_stride_fps_and_start(index_shards, options, first, step):
    batch = next(iter(loader(config(index_shards, clip_frames=3, **options))))  # videos: 8 frames at 8 fps
    frames = batch["actions"][..., 0]  # [B, T] frame indices
    expected = frames[:, :1] + torch.floor(torch.arange(3) * step + 1e-6)
    assert (frames == expected).all()
    if first is not None:
        assert (frames[:, 0] == first).all()


def test_clip_indices():
    rng = np.random.default_rng(0)
    assert clip_indices(10, 4, 3, None, rng).tolist() == [0, 3, 6, 9]
    assert clip_indices(10, 3, 1.5, 2, rng).tolist() == [2, 3, 5]
    for frames, start, reason in [
        (9, None, "too short: 9 frames"),
        (10, 1, "too short"),
        (0, None, "zero frames"),
    ]:
        with pytest.raises(SkipSample, match=reason):
            clip_indices(frames, 4, 3, start, rng)


@pytest.mark.parametrize("width", [16, 24, 32])
def test_video_reads_every_width(width):  # decord mis-copies 16 and 24; PyAV reads those
    source = pattern(6, 8, width)
    frames = Video(encode_video(source, fps=8, crf=0)).read([1, 3, 5]).permute(0, 2, 3, 1).numpy()
    assert frames.shape == (3, 8, width, 3) and np.abs(frames.astype(int) - source[[1, 3, 5]]).max() <= 3


def test_resize_crop():
    video = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).view(2, 3, 8, 12)  # [T, C, H, W]
    assert resize_crop(video, None) is video
    assert resize_crop(video, 8).shape == (2, 3, 8, 8)
    assert torch.equal(resize_crop(video, 8), video[..., 2:10])  # centre crop, no scaling
    assert resize_crop(video, [4, 4]).shape == (2, 3, 4, 4)
    assert resize_crop(video, [16, 12]).shape == (2, 3, 16, 12)  # scaled up to cover, then cropped
    crops = {resize_crop(video, 8, "random", np.random.default_rng(s))[0, 0, 0, 0].item() for s in range(20)}
    assert len(crops) > 1
    uint8 = torch.randint(0, 255, (2, 3, 16, 24), dtype=torch.uint8)
    assert resize_crop(uint8, 8).dtype == torch.uint8


def bad_shards(tmp_path) -> tuple[list[str], int]:
    """10 good samples and 5 bad ones: random bytes, a 2-frame video, no video, bad json, short actions."""
    good = encode_video(pattern(6, 8, 32), fps=8, crf=30)
    bad = [
        {"mp4": np.random.default_rng(0).bytes(500)},
        {"mp4": encode_video(pattern(2, 8, 32), fps=8)},
        {"txt": "no video"},
        {"mp4": good, "json": b"{not json"},
        {"mp4": good, "json": {"actions": [[0]] * 3}},
    ]
    samples = [{"mp4": good, "json": {"label": 1}}] * 10 + bad
    order = np.random.default_rng(1).permutation(len(samples))
    with ShardSink(tmp_path, maxcount=4) as sink:
        for i in order:
            sink.write({"__key__": f"k{i:03d}", **samples[i]})
    return sink.shards, len(bad)


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    shards, bad = bad_shards(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dforce.data.loader"):
        batches = list(loader(config(shards, shuffle=False), 3))  # one pass over 15 samples
    assert len(batches) == 5 and sum(batch["skipped"] for batch in batches) == bad
    assert all(
        batch["video"].shape == (3, 4, 3, 8, 32) and batch["label"].tolist() == [1] * 3 for batch in batches
    )
    reasons = " | ".join(caplog.messages)
    for reason in ["unreadable", "too short: 2 frames", "no video", "bad json", "actions has 3 rows"]:
        assert reason in reasons
    batches = list(loader(config(shards, num_workers=2), 3))
    assert len(batches) == 5 and all(batch["video"].shape[0] == 3 for batch in batches)


def test_an_unreadable_video_is_one_clear_reason(capfd):
    """decord would log the file's bytes to the C-level stderr; only the exception's reason remains."""
    with pytest.raises(SkipSample, match="unreadable"):
        Video(b"SECRET-PAYLOAD " * 100)
    assert "SECRET-PAYLOAD" not in capfd.readouterr().err


def test_a_batch_of_bad_samples_borrows_the_next_good_one(tmp_path):
    good = encode_video(pattern(6, 8, 32), fps=8, crf=30)
    with ShardSink(tmp_path) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "mp4": b"junk" if i < 2 else good, "json": {"label": i}})
    batches = labels(config(sink.shards, shuffle=False), 2)
    assert batches == [[2, 2], [2, 3]]


def test_all_bad_samples_is_an_error_naming_the_shards(tmp_path):
    with ShardSink(tmp_path) as sink:
        for i in range(4):
            sink.write({"__key__": f"k{i}", "mp4": b"junk"})
    with pytest.raises(ValueError, match=r"no decodable sample among 4 in a row in .*/train-000000\.tar"):
        list(loader(config(sink.shards)))


def test_empty_and_missing_shards_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no shards match .*nothing-\*\.tar"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "a-000000.tar").write_bytes(b"\0" * 1024)  # an empty tar file
    with pytest.raises(ValueError, match=r"shard not found: .*a-000001\.tar"):
        expand_shards(str(tmp_path / "a-{000000..000001}.tar"))
    with pytest.raises(ValueError, match=r"no samples in the shards .*a-000000\.tar"):
        loader(config(str(tmp_path / "a-000000.tar")))
    with pytest.raises(ValueError, match="make no batch of 2 on each of 4 ranks"):
        loader(config(write_index_shards(tmp_path / "few", shards=1, per_shard=7)), world_size=4)


def test_shard_patterns_and_urls(index_shards, tmp_path):
    folder = index_shards[0].rsplit("/", 1)[0]
    assert expand_shards(f"{folder}/train-{{000000..000007}}.tar") == index_shards
    assert expand_shards(f"{folder}/train-*.tar") == index_shards
    assert expand_shards(f"{index_shards[1]}::{index_shards[0]}") == index_shards[1::-1]
    with pytest.raises(ValueError, match="set samples_per_epoch"):
        loader(config("https://example.invalid/train-000000.tar"))
    piped = config([f"pipe:cat {shard}" for shard in index_shards], samples_per_epoch=24, shuffle=False)
    assert flat(labels(piped)) == list(range(24))


def test_latent_samples_are_scaled(tmp_path):
    latent = np.random.default_rng(0).normal(size=(6, 4, 2, 2)).astype(np.float16)  # [N, C, h, w]
    buffer = io.BytesIO()
    np.save(buffer, latent, allow_pickle=False)
    space = LatentSpace(
        vae_class="AutoencoderKL", config_hash="0" * 64, path="/vae", subfolder=None, temporal_compression=1,
        spatial_compression=8, causal=False, channels=4, scaling_factor=0.5, shift_factor=0.1,
    )  # fmt: skip
    record = {"latent": space.to_dict(), "actions": [[i] for i in range(6)]}
    with ShardSink(tmp_path) as sink:
        for i in range(2):
            sink.write({"__key__": f"k{i}", "latent.npy": buffer.getvalue(), "json": record})
    batch = next(iter(loader(config(sink.shards, clip_frames=3, clip_start=2, shuffle=False))))
    assert batch["latent"] and batch["video"].shape == (2, 3, 4, 2, 2)
    expected = (torch.from_numpy(latent[2:5]).float() - 0.1) * 0.5
    assert torch.allclose(batch["video"][0], expected) and batch["actions"][0, :, 0].tolist() == [2, 3, 4]


def test_config_is_checked():
    for options, message in [
        ({"crop": "left"}, "crop must be"),
        ({"size": [8]}, "size must be"),
        ({"clip_frames": 0}, "clip_frames"),
        ({"fps": 0.0}, "fps must be positive"),
        ({"pixels": "float16"}, "pixels must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            DataConfig(**options)


def text_shards(out, tokens: list[int], dim: int = 4) -> list[str]:
    """One shard of 8x32 videos whose samples hold `tokens[i]` text embeddings of width `dim`."""
    video = encode_video(pattern(4, 8, 32), fps=8, crf=30)
    with ShardSink(out) as sink:
        for n, count in enumerate(tokens):
            embedding = np.full((count, dim), n + 1, dtype=np.float16)  # [n, D]
            buffer = io.BytesIO()
            np.save(buffer, embedding, allow_pickle=False)
            record = {"caption": "x", "text": {"dim": dim, "tokens": count, "max_length": 6}}
            sink.write({"__key__": f"s{n}", "mp4": video, "json": record, "text.npy": buffer.getvalue()})
    return sink.shards


def test_text_is_padded_to_text_length(tmp_path):
    """Batches carry each clip's text embeddings zero-padded to data.text_length, and the mask of its
    tokens; a sample with more tokens than that is skipped with the reason."""
    shards = text_shards(tmp_path, [2, 5, 9])
    batch = next(iter(loader(config(shards, shuffle=False, text_length=6), batch_size=3)))
    states, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
    assert states.shape == (3, 6, 4) and mask.shape == (3, 6) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [2, 5, 2] and batch["skipped"] == 1  # the third: a copy of the first
    assert (states[0, :2] == 1).all() and (states[0, 2:] == 0).all() and (states[1, :5] == 2).all()
    assert (states[~mask] == 0).all()


def test_a_model_that_reads_text_refuses_shards_without_it(tmp_path, index_shards):
    """`check_text` names the shards and what they lack: no caption at all, captions not yet encoded, text
    of another width, or longer than data.text_length."""
    with pytest.raises(ValueError, match=r"index_shards.*hold no text\.npy .* give the videos a caption"):
        check_text(config(index_shards), 4)
    with ShardSink(tmp_path, prefix="c") as sink:
        sink.write({"__key__": "s", "mp4": b"", "json": {"caption": "a ball"}})
    with pytest.raises(ValueError, match=r"c-000000\.tar hold no text\.npy .*: run dforce encode-text"):
        check_text(config(sink.shards), 4)
    shards = text_shards(tmp_path / "t", [2])
    check_text(config(shards, text_length=6), 4)
    with pytest.raises(ValueError, match="text embeddings of width 4; the model reads 8"):
        check_text(config(shards), 8)
    with pytest.raises(ValueError, match=r"up to 6 tokens, more than data\.text_length=3"):
        check_text(config(shards, text_length=3), 4)
