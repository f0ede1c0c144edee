import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dforce.cli import main
from dforce.data.clips import DataConfig
from dforce.data.decode import decode_video
from dforce.data.loader import make_loader
from dforce.data.reading import read_samples
from dforce.data.shards import ShardSink, make_shards


def samples_of(shards) -> list[dict]:
    return list(read_samples(shards))


def names(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_make_shards_reads_all_containers_and_skips_bad_files(videos, tmp_path):
    summary = make_shards([videos.root], tmp_path, maxcount=2)
    assert summary.videos == 8
    assert summary.samples == 6 and len(summary.shards) == 3
    reasons = {Path(source).stem: reason for source, reason in summary.skipped}
    assert reasons.keys() == {"broken", "empty"}  # short.mp4 is a fine video without --clip-frames
    assert reasons["broken"].startswith("unreadable") and reasons["empty"] == "empty file"
    assert "2 skipped" in str(summary) and "broken.mp4: unreadable" in str(summary)
    assert not list(tmp_path.glob("*.partial"))
    samples = samples_of(summary.shards)
    assert sorted(s["__key__"].split("_", 1)[1] for s in samples) == ["a", "b", "c", "d", "e", "short"]
    records = {Path(json.loads(s["json"])["source"]).name: (s, json.loads(s["json"])) for s in samples}
    sample, record = records["a.mp4"]
    assert record["label"] == 2 and len(record["actions"]) == 12
    assert (record["frames"], record["height"], record["width"], record["fps"]) == (12, 16, 32, 8.0)
    assert sample["mp4"] == (videos.root / "a.mp4").read_bytes()  # kept as it is
    assert records["d.webm"][0]["webm"] == (videos.root / "sub/d.webm").read_bytes()


def test_reencoded_clips_stay_close_to_the_source(videos, tmp_path):
    summary = make_shards(videos.good, tmp_path, clip_frames=5, stride=3, crf=8)
    assert summary.videos == 5 and summary.samples == 5 * 3  # clips start at frames 0, 3, 6
    for sample in samples_of(summary.shards):
        record = json.loads(sample["json"])
        source = decode_video(Path(record["source"]).read_bytes()).permute(0, 2, 3, 1).numpy()  # [T, H, W, C]
        start = record["clip_start"]
        assert record["frames"] == 5 and start in (0, 3, 6) and record["source_frames"] == 12
        clip = decode_video(sample["mp4"]).permute(0, 2, 3, 1).numpy().astype(float)  # [T, H, W, C]
        error = np.abs(clip - source[start : start + 5])
        assert error.mean() < 2 and error.max() < 25, (record["source"], error.mean(), error.max())
        if record["source"].endswith("a.mp4"):
            assert record["actions"] == [[i, -i] for i in range(start, start + 5)]


def test_clips_skip_short_videos_and_mismatched_actions(videos, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("a.mp4", "short.mp4"):
        (tmp_path / "in" / name).write_bytes((videos.root / name).read_bytes())
    (tmp_path / "in" / "a.json").write_text(json.dumps({"actions": [[0]] * 11}))
    summary = make_shards([tmp_path / "in"], tmp_path / "out", clip_frames=4)
    reasons = {Path(source).name: reason for source, reason in summary.skipped}
    assert reasons == {
        "a.mp4": "sidecar actions has 11 rows for 12 frames",
        "short.mp4": reasons["short.mp4"],
    }
    assert reasons["short.mp4"].startswith("too short: 2 frames")
    assert summary.samples == 0 and summary.shards == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "size, pix_fmt, shape", [(8, "yuv444p", (8, 12)), ((8, 10), "yuv444p", (8, 10)), (7, "yuv420p", (8, 10))]
)
def test_resize(videos, tmp_path, size, pix_fmt, shape):
    summary = make_shards([videos.root / "e.mp4"], tmp_path, size=size, pix_fmt=pix_fmt)  # 16x24 source
    (sample,) = samples_of(summary.shards)
    record = json.loads(sample["json"])
    assert (record["height"], record["width"]) == shape
    assert decode_video(sample["mp4"]).shape == (12, 3, *shape)


def test_labels_csv(videos, tmp_path):
    a, d = (os.path.relpath(videos.root / name, tmp_path) for name in ("a.mp4", "sub/d.webm"))
    (tmp_path / "labels.csv").write_text(f"path,label,split\n{a},7,train\n{d},3,val\n")
    summary = make_shards(
        [videos.root / "a.mp4", videos.root / "sub"], tmp_path / "out", labels=tmp_path / "labels.csv"
    )
    records = {Path(r["source"]).name: r for r in (json.loads(s["json"]) for s in samples_of(summary.shards))}
    assert records["a.mp4"]["label"] == 2 and records["a.mp4"]["split"] == "train"  # the sidecar json wins
    assert records["d.webm"]["label"] == 3 and records["d.webm"]["split"] == "val"
    for text, message in [
        ("file,label\na.mp4,1\n", "must name a 'path' column"),
        ("path,label\n,1\n", "line 2: no path"),
    ]:
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            make_shards([videos.root / "a.mp4"], tmp_path / "out2", labels=tmp_path / "bad.csv")


def test_shards_round_trip_through_the_loader(videos, tmp_path):
    good = [p for p in videos.good if p.suffix == ".mp4" and p.name != "e.mp4"]  # H.264 4:4:4, 16x32
    shards = make_shards(good, tmp_path).shards
    config = DataConfig(shards=shards, clip_frames=12, clip_start=0, num_workers=0, shuffle=False)
    (batch,) = list(make_loader(config, batch_size=2))
    assert batch["video"].shape == (2, 12, 3, 16, 32) and batch["skipped"] == 0
    assert "label" not in batch and "actions" not in batch  # a.mp4 has them, b.mp4 not
    for key, video in zip(batch["key"], batch["video"], strict=True):
        source = videos.sources[next(p for p in good if key.endswith(p.stem))]
        pixels = (video.permute(0, 2, 3, 1).numpy() + 1) * 127.5  # [T, H, W, C]
        assert np.abs(pixels - source).mean() < 1.5


def test_existing_shards_need_overwrite(tmp_path):
    with ShardSink(tmp_path, maxcount=1) as sink:
        sink.write({"__key__": "x", "txt": "1"})
        sink.write({"__key__": "y", "txt": "2"})
    assert sorted(Path(p).name for p in sink.shards) == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(ValueError, match="already holds 2 train"):
        ShardSink(tmp_path)
    (tmp_path / "train-000007.tar.partial").write_bytes(b"left by a killed run")
    with ShardSink(tmp_path, overwrite=True) as sink:
        sink.write({"__key__": "z", "txt": "3"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    assert names(tmp_path / "train-000000.tar") == ["z.txt"]


def test_a_failing_run_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError), ShardSink(tmp_path, maxcount=10) as sink:
        sink.write({"__key__": "x", "txt": "1"})
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["train-000000.tar"]
    assert names(tmp_path / "train-000000.tar") == ["x.txt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["make-shards", "nowhere.mp4", "--out", "x"],
            "dforce make-shards: no such file or folder: nowhere.mp4",
        ),
        (["make-shards", ".", "--out", "x", "--size", "64x"], "dforce make-shards: bad size '64x'"),
        (["make-shards", ".", "--out", "x", "--stride", "2"], "dforce make-shards: stride needs clip_frames"),
        (["make-synthetic", "--out", "x", "--balls", "9"], "dforce make-synthetic: at most 8 balls"),
        (["make-synthetic", "--out", "x", "--maxcount", "0"], "dforce make-synthetic: maxcount must be >= 1"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert str(exit.value).startswith(message)


def test_cli_make_shards(videos, tmp_path, capsys):
    main(["make-shards", str(videos.root / "a.mp4"), str(videos.root / "broken.mp4"), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 videos read, 1 samples written to 1 shards, 1 skipped" in out
    assert "broken.mp4: unreadable" in out


def test_make_shards_that_writes_nothing_fails(videos, tmp_path, capsys):
    """No video among the inputs, or every one skipped: a one-line error naming the inputs (and the reason)
    after the summary, so that a script stops there; nothing is written."""
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 100)
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(text)], f"the video read from {text} was skipped ({text}: unreadable"),
        ([str(tmp_path / "empty")], f"no videos in {tmp_path / 'empty'} (folders are searched for .mp4"),
        (
            [str(videos.root / "broken.mp4"), str(videos.root / "empty.mp4")],
            f"all 2 videos read from {videos.root / 'broken.mp4'}, {videos.root / 'empty.mp4'} were skipped "
            "(each reason is listed above)",
        ),
    ]
    for inputs, message in cases:
        with pytest.raises(SystemExit) as exit:
            main(["make-shards", *inputs, "--out", str(tmp_path / "out")])
        assert str(exit.value).startswith(f"dforce make-shards: nothing written: {message}")
        assert "\n" not in str(exit.value)
        assert "0 samples written to 0 shards" in capsys.readouterr().out  # the summary, skips listed
    assert not (tmp_path / "out").exists()


def test_make_shards_exit_status(videos, tmp_path):
    """The shell sees it: `dforce make-shards NOT_A_VIDEO` exits 1 with the message on stderr, a video 0."""
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n")
    for inputs, status in [(text, 1), (videos.root / "a.mp4", 0)]:
        command = [sys.executable, "-m", "dforce", "make-shards", str(inputs), "--out", str(tmp_path / "out")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == status, result.stderr
        refusal = f"dforce make-shards: nothing written: the video read from {text} was skipped"
        assert not status or result.stderr.strip().splitlines()[-1].startswith(refusal)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["train-000000.tar"]


def test_captions_from_sidecars_and_the_labels_csv(videos, tmp_path):
    """A sidecar's `caption` wins over the CSV's column, as every sidecar field does; a blank CSV cell is no
    caption; a caption that is not text skips its video with the reason."""
    for name in "a.mp4", "b.mp4", "c.mkv":
        (tmp_path / name).write_bytes((videos.root / name).read_bytes())
    (tmp_path / "a.json").write_text(json.dumps({"caption": "a red ball falls"}))
    csv = "path,caption\na.mp4,from the csv\nb.mp4,two balls collide\nc.mkv,\n"
    (tmp_path / "labels.csv").write_text(csv)
    summary = make_shards([tmp_path], tmp_path / "out", labels=tmp_path / "labels.csv")
    records = {Path(r["source"]).name: r for r in (json.loads(s["json"]) for s in samples_of(summary.shards))}
    assert records["a.mp4"]["caption"] == "a red ball falls"
    assert records["b.mp4"]["caption"] == "two balls collide"
    assert "caption" not in records["c.mkv"]
    (tmp_path / "b.json").write_text(json.dumps({"caption": ["two", "captions"]}))
    summary = make_shards([tmp_path / "b.mp4"], tmp_path / "out2")
    assert summary.samples == 0 and "caption is list, not text" in summary.skipped[0][1]
