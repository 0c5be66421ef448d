"""Latent datasets: a folder of real video files encoded through a tiny random DC-AE (and through
pixels) into shards, what is skipped and why, resuming after a kill, and the windows training reads."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from scd import data, dataset
from scd.codecs import DCAECodec
from scd.errors import ConfigError, DataError
from scd.mp4 import write_video
from scd.train import TrainSettings
from scd.video import fit_frames, frames_to_tensor, read_video
from scd_cli.app import app

import diffusers  # noqa: E402,F401  the [test] extra's: missing, this module fails rather than skipping unseen
from test_codecs import FACTOR, tiny_autoencoder, write_codec_folder  # noqa: E402


def moving_square(n, seed, size=(20, 24)):
    """n frames of a colored square moving right over a dark background."""
    rng = np.random.default_rng(seed)
    frames = np.full((n, *size, 3), 20, np.uint8)
    color = rng.integers(80, 255, 3)
    for j in range(n):
        x = (2 * j) % (size[1] - 6)
        frames[j, 5:12, x:x + 6] = color
    return frames


def cut_short(path, keep_fragments):
    """Cut scd's fragmented MP4 inside fragment `keep_fragments`: the frames before it survive."""
    raw = path.read_bytes()
    fragments = [i for i in range(len(raw)) if raw[i:i + 4] == b"moof"]
    path.write_bytes(raw[:fragments[keep_fragments] + 40])


@pytest.fixture
def videos(tmp_path):
    """Two class folders of real MP4 files: actions beside one clip, one corrupt, one truncated, one too short."""
    root = tmp_path / "videos"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    write_video(root / "cats" / "a.mp4", moving_square(12, 0), fps=8)
    (root / "cats" / "a.actions.txt").write_text("right\n" * 5 + "up\n" * 20)
    write_video(root / "cats" / "b.mp4", moving_square(9, 1), fps=8)
    write_video(root / "dogs" / "c.mp4", moving_square(10, 2), fps=8)
    cut_short(write_video(root / "dogs" / "cut.mp4", moving_square(10, 3), fps=8), 6)
    (root / "dogs" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(300))
    write_video(root / "dogs" / "short.mp4", moving_square(1, 4), fps=8)
    (root / "notes.txt").write_text("not a video")
    return root


def dcae_encoding(**kw):
    return dataset.Encoding(DCAECodec(tiny_autoencoder(), FACTOR), {"type": "dcae", "scaling_factor": FACTOR, "downsample": 4},
                            (16, 16), ("up", "down", "left", "right"), **kw)


def run(events):
    events = list(events)
    return events, events[-1]


def stored(folder):
    """Every clip of a dataset: (source, part) -> (latents, actions or None)."""
    index = json.loads((folder / "index.json").read_text())
    out = {}
    for shard in index["shards"]:
        tensors = load_file(str(folder / shard["file"]))
        for c in shard["clips"]:
            out[(c["source"], c["part"])] = (tensors[f"{c['key']}.latents"], tensors.get(f"{c['key']}.actions"))
    return out


def test_a_tiny_dcae_encodes_a_folder_of_real_videos(videos, tmp_path):
    encoding = dcae_encoding()
    events, report = run(dataset.encode_folder(videos, tmp_path / "ds", encoding, shard_mb=0.003, chunk=4))
    assert isinstance(events[0], dataset.EncodeStarted) and events[0].files == 6 and events[0].already == 0
    files = {e.source: e for e in events if isinstance(e, dataset.FileEncoded)}
    assert files["dogs/broken.mp4"].skipped == "corrupt" and "broken.mp4" in files["dogs/broken.mp4"].detail
    assert files["dogs/short.mp4"].skipped == "too short" and "1 frames" in files["dogs/short.mp4"].detail
    assert files["dogs/cut.mp4"].truncated and files["dogs/cut.mp4"].frames == 6 and files["dogs/cut.mp4"].skipped is None
    assert report.skipped == {"corrupt": [("dogs/broken.mp4", files["dogs/broken.mp4"].detail)],
                              "too short": [("dogs/short.mp4", files["dogs/short.mp4"].detail)]}
    assert [s for s, _ in report.truncated] == ["dogs/cut.mp4"] and report.frames == 12 + 9 + 10 + 6
    assert report.shards > 1 and report.shards == len([e for e in events if isinstance(e, dataset.ShardWritten)])

    # the latents are the codec's of the fitted frames; a video cut by a shard boundary is whole again in order
    clips = stored(tmp_path / "ds")
    for source, frames in (("cats/a.mp4", 12), ("cats/b.mp4", 9), ("dogs/c.mp4", 10), ("dogs/cut.mp4", 6)):
        parts = [clips[k] for k in sorted(k for k in clips if k[0] == source)]
        latents = torch.cat([p[0] for p in parts])
        pixels = read_video(videos / source).frames
        expected = encoding.codec.encode(frames_to_tensor(fit_frames(pixels, (16, 16))))
        assert latents.shape == (frames, 8, 4, 4) and torch.allclose(latents, expected, atol=1e-5), source
        actions = torch.cat([p[1] for p in parts])
        want = [3] * 5 + [0] * 7 if source == "cats/a.mp4" else [4] * frames  # no file: the null action
        assert actions.tolist() == want
    assert any(k[1] > 0 for k in clips)  # the shard budget split a video

    ds = dataset.LatentDataset(tmp_path / "ds")
    assert ds.labels == ("cats", "dogs") and ds.latent_shape == (8, 4, 4) and ds.fps == 8.0
    assert {c.source: c.label for c in ds.clips} == {"cats/a.mp4": 0, "cats/b.mp4": 0, "dogs/c.mp4": 1, "dogs/cut.mp4": 1}
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    cut = [c for s in index["shards"] for c in s["clips"] if c["source"] == "dogs/cut.mp4"]
    assert cut and all("ends inside an MP4 box" in c["truncated"] for c in cut)
    # its autoencoder travels with it, and nothing else is in the folder
    assert sorted(p.name for p in (tmp_path / "ds").iterdir() if not p.name.startswith("shard-")) == ["codec", "index.json"]
    assert dataset.codec_fingerprint(DCAECodec.from_folder(tmp_path / "ds" / "codec")) == ds.codec_fingerprint


def test_shards_stay_within_their_budget(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(3):
        write_video(root / f"v{i}.mp4", moving_square(40, i, size=(16, 16)), fps=8)
    budget = 16 * 16 * 3 * 10  # ten uint8 frames
    _, report = run(dataset.encode_folder(root, tmp_path / "ds", dataset.pixel_encoding((16, 16)),
                                          shard_mb=budget / 2 ** 20, chunk=4))
    sizes = [sum(t.numel() for t in load_file(str(p)).values()) for p in sorted((tmp_path / "ds").glob("shard-*"))]
    assert report.frames == 120 and len(sizes) == 10 and max(sizes) <= budget + 16 * 16 * 3 * 4  # + one chunk
    # pixels are stored exactly: what training reads is frames_to_tensor of the fitted frames
    ds = dataset.LatentDataset(tmp_path / "ds")
    first = ds.clips[0]
    latents, conditions = ds.window(0, 2, 5, "action", null=7)
    assert torch.equal(latents, frames_to_tensor(read_video(root / "v0.mp4").frames[2:7]))
    assert conditions.tolist() == [7] * 5 and first.label is None


def test_encoding_again_continues_after_a_kill(videos, tmp_path):
    encoding = dcae_encoding()
    _, straight = run(dataset.encode_folder(videos, tmp_path / "straight", encoding, shard_mb=0.003, chunk=4))
    out = tmp_path / "killed"
    events = dataset.encode_folder(videos, out, encoding, shard_mb=0.003, chunk=4)
    shards = 0
    for event in events:  # stop right after the second shard, as a kill would: no clean-up runs
        shards += isinstance(event, dataset.ShardWritten)
        if shards == 2:
            break
    index = json.loads((out / "index.json").read_text())
    assert index["partial"] is not None and not index["complete"]  # it stopped inside a video
    with pytest.raises(DataError, match="incomplete"):
        dataset.LatentDataset(out)
    (out / "shard-00002.safetensors").write_bytes(b"half a shard")  # written, not yet listed
    (out / ".index.json.tmp").write_text("{")
    events, report = run(dataset.encode_folder(videos, out, encoding, shard_mb=0.003, chunk=4))
    assert events[0].already == 1 and report.resumed == 1
    assert not (out / ".index.json.tmp").exists()
    assert report.frames == straight.frames and report.shards == straight.shards and report.skipped == straight.skipped
    a, b = stored(tmp_path / "straight"), stored(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)
    # nothing left to do: a third run writes nothing new
    events, again = run(dataset.encode_folder(videos, out, encoding, shard_mb=0.003, chunk=4))
    assert events[0].already == 6 and again.shards == report.shards


def interrupt_after_shards(cmd, env, index, shards, sig):
    """Start `cmd`, send `sig` once the index lists `shards` shards; its exit code and stderr."""
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        try:
            listed = len(json.loads(index.read_text()).get("shards", []))
        except (OSError, ValueError):
            listed = 0
        if listed >= shards:
            child.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = child.communicate(timeout=60)
    return child.returncode, err


def test_scd_encode_survives_ctrl_c_and_kill_9(tmp_path):
    """`scd encode` stopped by Ctrl-C, then by kill -9, in the middle: encoding again finishes with every frame once."""
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(8):
        write_video(root / f"v{i}.mp4", moving_square(30, i, size=(32, 32)), fps=8)
    cmd = [sys.executable, "-m", "scd_cli.app", "encode", str(root), "--out", str(tmp_path / "ds"), "--frame-size", "32",
           "--shard-mb", "0.01", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout, from any directory
    index = tmp_path / "ds" / "index.json"
    code, err = interrupt_after_shards(cmd, env, index, 1, signal.SIGINT)
    assert code == 130 and "run the same command to continue" in err, err
    first = len(json.loads(index.read_text())["shards"])
    code, _ = interrupt_after_shards(cmd, env, index, first + 2, signal.SIGKILL)
    assert code == -signal.SIGKILL  # killed in the middle, not finished
    assert not json.loads(index.read_text())["complete"]
    # encoding again (here in this process: the same library call the command makes) finishes it
    _, report = run(dataset.encode_folder(root, tmp_path / "ds", dataset.pixel_encoding((32, 32)), shard_mb=0.01))
    assert report.frames == 240 and not report.skipped
    clips = stored(tmp_path / "ds")
    for i in range(8):
        frames = torch.cat([clips[k][0] for k in sorted(k for k in clips if k[0] == f"v{i}.mp4")])
        assert torch.equal(frames, torch.from_numpy(read_video(root / f"v{i}.mp4").frames).permute(0, 3, 1, 2)), i


def test_other_settings_and_wrong_folders_are_refused(videos, tmp_path):
    run(dataset.encode_folder(videos, tmp_path / "ds", dataset.pixel_encoding((16, 16), ("up", "down", "left", "right"))))
    with pytest.raises(DataError, match=r"other settings \(frame_size \[16, 16\] -> \[24, 24\]\)"):
        run(dataset.encode_folder(videos, tmp_path / "ds", dataset.pixel_encoding((24, 24), ("up", "down", "left", "right"))))
    with pytest.raises(DataError, match="holds actions but no action names"):
        run(dataset.encode_folder(videos, tmp_path / "x", dataset.pixel_encoding((16, 16))))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("keep me")
    with pytest.raises(DataError, match="not empty and holds no dataset index"):
        run(dataset.encode_folder(videos, tmp_path / "full", dataset.pixel_encoding((16, 16), ("up", "down", "left", "right"))))
    assert (tmp_path / "full" / "thesis.tex").read_text() == "keep me"
    with pytest.raises(DataError, match="does not exist"):
        run(dataset.encode_folder(tmp_path / "nope", tmp_path / "y", dataset.pixel_encoding((16, 16))))
    with pytest.raises(ConfigError, match="multiples of the codec's downsampling"):
        dcae_encoding().__class__(DCAECodec(tiny_autoencoder(), FACTOR), {"type": "dcae"}, (18, 18))
    with pytest.raises(DataError, match="not a latent dataset"):
        dataset.LatentDataset(videos)


def windows_of(ds, settings, config, rank=0, ranks=1, workers=0, start=0, steps=3):
    source = data.dataset_batches(ds, settings, config, workers)(start, rank, ranks)
    return [next(source) for _ in range(steps)]


def test_windows_depend_on_seed_step_and_position_only(videos, tmp_path):
    from conftest import tiny_config

    run(dataset.encode_folder(videos, tmp_path / "ds", dcae_encoding()))
    ds = dataset.LatentDataset(tmp_path / "ds")
    config = tiny_config(channels=8, patch_size=1, latent_size=(4, 4), frame_size=(16, 16),
                         codec={"type": "dcae", "scaling_factor": FACTOR, "downsample": 4})
    settings = TrainSettings(batch_size=4, clip_frames=5, seed=3)
    straight = windows_of(ds, settings, config, steps=4)
    assert straight[0][0].shape == (4, 5, 8, 4, 4) and straight[0][1].shape == (4, 5)
    # workers read the same windows; a resumed reader starts at its step
    with_workers = windows_of(ds, settings, config, workers=2, steps=4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(straight, with_workers))
    resumed = windows_of(ds, settings, config, start=2, steps=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(straight[2:], resumed))
    # two processes of batch 2 read the two halves of one process's batch of 4
    half = TrainSettings(batch_size=2, clip_frames=5, seed=3)
    rank0, rank1 = windows_of(ds, half, config, 0, 2), windows_of(ds, half, config, 1, 2)
    for whole, a, b in zip(straight, rank0, rank1):
        assert torch.equal(whole[0], torch.cat([a[0], b[0]])) and torch.equal(whole[1], torch.cat([a[1], b[1]]))
    assert not torch.equal(straight[0][0], windows_of(ds, TrainSettings(batch_size=4, clip_frames=5, seed=4), config)[0][0])
    # a class-conditioned model reads each clip's class (cats 0, dogs 1) on every frame
    labelled = tiny_config(channels=8, patch_size=1, latent_size=(4, 4), frame_size=(16, 16), condition="label",
                           num_classes=2, codec={"type": "dcae", "scaling_factor": FACTOR, "downsample": 4})
    for _, labels in windows_of(ds, settings, labelled):
        assert set(labels.flatten().tolist()) <= {0, 1} and all(len(set(row.tolist())) == 1 for row in labels)
    assert {row[0].item() for _, labels in windows_of(ds, settings, labelled, steps=6) for row in labels} == {0, 1}
    # the model must take these latents and labels
    with pytest.raises(DataError, match="latents of shape"):
        data.dataset_batches(ds, settings, tiny_config(channels=4, patch_size=1, latent_size=(4, 4),
                                                       codec={"type": "dcae", "scaling_factor": FACTOR, "downsample": 4}))
    with pytest.raises(DataError, match="codec"):
        data.dataset_batches(ds, settings, tiny_config(channels=8, patch_size=1, latent_size=(4, 4)))
    with pytest.raises(DataError, match="at least 50 frames"):
        data.dataset_batches(ds, TrainSettings(clip_frames=50), config)


def test_scd_encode_command(videos, tmp_path):
    runner = CliRunner()
    write_codec_folder(tiny_autoencoder(), tmp_path / "dcae")
    r = runner.invoke(app, ["encode", str(videos), "--out", str(tmp_path / "ds"), "--codec", str(tmp_path / "dcae"),
                            "--frame-size", "16", "--action-names", "up,down,left,right", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert "37 frames" in r.output and "2 skipped, 1 truncated" in r.output
    assert "skipped 1 (corrupt): dogs/broken.mp4" in r.output and "truncated (frames before the cut kept): dogs/cut.mp4" in r.output
    # a.actions.txt lists 25 actions for 12 frames; the others have none: said, one line each
    assert "actions: cats/a.mp4: 25 actions for 12 frames: the last 13 are not used" in r.output
    assert "actions: cats/b.mp4: no b.actions.txt: all 9 frames take the null action" in r.output
    assert load_file(str(tmp_path / "ds" / "shard-00000.safetensors"))["0.latents"].dtype == torch.bfloat16
    r = runner.invoke(app, ["encode", str(videos), "--out", str(tmp_path / "px")])
    assert r.exit_code == 2 and "--frame-size is needed" in r.output
    r = runner.invoke(app, ["encode", str(tmp_path / "nope"), "--out", str(tmp_path / "px"), "--frame-size", "16"])
    assert r.exit_code == 2 and "does not exist" in r.output and len(r.output.strip().splitlines()) == 1


TINY_TRAIN = ["--heads", "2", "--head-dim", "16", "--layers", "3", "--decoder-layers", "1", "--patch-size", "1",
              "--batch-size", "4", "--clip-frames", "4", "--warmup", "1", "--checkpoint-every", "3"]


def losses(folder):
    return [float(r.split(",")[1]) for r in (folder / "losses.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_train_from_a_dcae_dataset(videos, tmp_path, arch):
    """Both models learn from DC-AE latents; a resumed run (with DataLoader workers) is the straight run."""
    from scd.checkpoints import load_model_folder
    from scd.codecs import load_codec

    runner = CliRunner()
    run(dataset.encode_folder(videos, tmp_path / "ds", dcae_encoding()))
    common = ["train", "--arch", arch, "--data", str(tmp_path / "ds"), *TINY_TRAIN, "--workers", "0"]
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "long"), "--steps", "30", "--lr", "3e-3"])
    assert r.exit_code == 0, r.output
    curve = losses(tmp_path / "long")
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5, curve
    loaded = load_model_folder(tmp_path / "long")
    c = loaded.config
    assert (c.channels, c.latent_size, c.frame_size, c.condition, c.action_names) == \
        (8, (4, 4), (16, 16), "action", ("up", "down", "left", "right"))
    assert load_codec(c.codec, loaded.folder).encode(torch.zeros(1, 3, 16, 16)).shape == (1, 8, 4, 4)
    assert "latent dataset" in (tmp_path / "long" / "README.md").read_text()

    r = runner.invoke(app, [*common, "--out", str(tmp_path / "a"), "--steps", "6"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "b"), "--steps", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common[:-1], "2", "--out", str(tmp_path / "b"), "--steps", "6", "--resume"])
    assert r.exit_code == 0, r.output
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tuning_needs_the_datasets_codec(videos, tmp_path):
    """A model is refused a dataset encoded by another autoencoder, even of the same shape."""
    runner = CliRunner()
    run(dataset.encode_folder(videos, tmp_path / "ds", dcae_encoding()))
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "ds"), *TINY_TRAIN, "--workers", "0", "--steps", "1",
                            "--out", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    write_codec_folder(tiny_autoencoder(seed=9), tmp_path / "m2" / "codec")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "m2" / name).write_bytes((tmp_path / "m" / name).read_bytes())
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "m2"), "--data", str(tmp_path / "ds"), "--steps", "1",
                            "--batch-size", "1", "--clip-frames", "3", "--workers", "0", "--out", str(tmp_path / "t")])
    assert r.exit_code == 2 and "another autoencoder" in r.output
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "m"), "--data", str(tmp_path / "ds"), "--steps", "1",
                            "--batch-size", "1", "--clip-frames", "3", "--workers", "0", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output


def test_actions_without_names_are_indices(tmp_path):
    """FAR's action models name no actions: action files then hold indices below num_actions."""
    from conftest import tiny_config

    root = tmp_path / "videos"
    root.mkdir()
    write_video(root / "a.mp4", moving_square(5, 0, size=(16, 16)), fps=8)
    (root / "a.actions.txt").write_text("3\n1\n0\n")
    (root / "b.mp4").write_bytes((root / "a.mp4").read_bytes())
    (root / "b.actions.txt").write_text("4\n7\n")  # 7 is no action of 4 (4 itself is the null action)
    _, report = run(dataset.encode_folder(root, tmp_path / "ds", dataset.pixel_encoding((16, 16), num_actions=4)))
    assert [s for s, _ in report.skipped["bad actions"]] == ["b.mp4"] and "out of range 0..4" in report.skipped["bad actions"][0][1]
    assert stored(tmp_path / "ds")[("a.mp4", 0)][1].tolist() == [3, 1, 0, 4, 4]
    # the padding is reported, not silent
    assert report.actions == [("a.mp4", "3 actions for 5 frames: frames 3-4 take the null action")]
    ds = dataset.LatentDataset(tmp_path / "ds")
    assert data.model_fields(ds)["condition"] == "action" and data.model_fields(ds)["num_classes"] == 4
    unnamed = tiny_config(latent_size=(16, 16), frame_size=(16, 16), action_names=())
    data.check_fits(ds, unnamed)
    with pytest.raises(DataError, match="has 4 actions but the model has 6"):
        data.check_fits(ds, tiny_config(latent_size=(16, 16), frame_size=(16, 16), action_names=(), num_classes=6))
    with pytest.raises(ConfigError, match="2 action names for 4 actions"):
        dataset.pixel_encoding((16, 16), ("up", "down"), num_actions=4)
