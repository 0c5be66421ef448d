"""`scd eval` on the embedded default models, and its refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import random_model, tiny_config
from typer.testing import CliRunner

from scd import world
from scd.checkpoints import save_model_folder
from scd.evaluate import _summary, evaluate
from scd.models import build_model
from scd_cli.app import app

runner = CliRunner()


def copy_last_frame_psnr(clips: int, context: int, frames: int) -> np.ndarray:
    """Copy-last-frame's PSNR (dB) per generated frame, mean over the held-out clips, from the
    world's own frames: numpy, independent of scd.metrics (identical frames capped at 100 dB)."""
    scores = np.zeros((clips, frames))
    for i in range(clips):
        video = world.render_clip(world.HELDOUT_SEED_START + i, context + frames)[0].astype(np.float64) / 255
        for u in range(frames):
            mse = np.mean((video[context + u] - video[context - 1]) ** 2)
            scores[i, u] = 100.0 if mse == 0 else min(100.0, 10 * np.log10(1 / mse))
    return scores.mean(0)


def assert_copy_last_frame(result, clips, context, frames):
    expected = copy_last_frame_psnr(clips, context, frames)
    assert result["copy_last_frame"]["psnr_per_frame"] == pytest.approx(expected, abs=1e-3)
    assert result["copy_last_frame"]["psnr"] == pytest.approx(expected.mean(), abs=1e-6)
    assert 5 < expected.min() and expected.max() < 60  # a moving world: the copy is off, not exact


def test_eval_without_arguments_scores_the_embedded_models(tmp_path):
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--clips", "2", "--context", "4", "--frames", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["scd"]["model"].startswith("embedded") and result["baseline"]["model"].startswith("embedded")
    from scd.checkpoints import load_model

    default = load_model(None, arch="scd").config.default_steps
    assert result["steps"] == result["scd"]["steps"] == default and result["frames"] == 2 and result["context"] == 4
    for name in ("scd", "baseline", "copy_last_frame", "object_free"):
        assert len(result[name]["psnr_per_frame"]) == 2 and 5 < result[name]["psnr"] < 60
        assert 0 < result[name]["ssim"] <= 1
        agent = result[name]["objects"]["agent"]
        assert len(agent["hit_rate"]) == 2 and result[name]["agent_hit_rate_last"] == agent["hit_rate"][-1]
    assert result["object_free"]["agent_hit_rate_last"] == 0.0  # the agent is erased
    assert_copy_last_frame(result, 2, 4, 2)


def test_eval_refuses_bad_input(tmp_path):
    r = runner.invoke(app, ["eval", "--clips", "0"])
    assert r.exit_code == 2 and "--clips must be >= 1" in r.output
    wrong = save_model_folder(build_model(tiny_config(latent_size=(16, 16), frame_size=(16, 16), patch_size=8)), tmp_path / "m")
    r = runner.invoke(app, ["eval", "--model", str(wrong), "--clips", "1", "--frames", "1"])
    assert r.exit_code == 2 and "32x32" in r.output, r.output
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 2, r.output


def test_eval_scores_hand_made_cases():
    truth = np.random.default_rng(0).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    same = _summary(truth, truth)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0)
    off = np.clip(truth.astype(int) + 10, 0, 255).astype(np.uint8)
    mse = ((off.astype(float) - truth) / 255) ** 2
    expected = np.mean([10 * np.log10(1 / m.mean()) for m in mse.reshape(6, -1)])
    assert _summary(off, truth)["psnr"] == pytest.approx(expected, rel=1e-6)


def test_eval_runs_models_and_copy_last_frame(tmp_path):
    world = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8)
    models = {}
    for arch in ("scd", "baseline"):
        from scd.checkpoints import load_model_folder
        models[arch] = load_model_folder(save_model_folder(random_model(tiny_config(arch=arch, **world)), tmp_path / arch))
    result = evaluate(models, clips=2, context=3, frames=2, steps=2)
    assert result["clips"] == 2 and result["frames"] == 2
    for name in ("scd", "baseline", "copy_last_frame"):
        assert len(result[name]["psnr_per_frame"]) == 2 and 0 < result[name]["psnr"] < 100
    assert_copy_last_frame(result, 2, 3, 2)
    json_path = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "scd"), "--baseline", str(tmp_path / "baseline"),
                            "--clips", "1", "--context", "2", "--frames", "1", "--steps", "1", "--json", str(json_path)])
    assert r.exit_code == 0, r.output
    written = json.loads(json_path.read_text())
    assert set(written) >= {"scd", "baseline", "copy_last_frame", "clips", "frames", "context", "steps"}
    assert written["clips"] == 1 and written["context"] == 2 and written["steps"] == 1
    assert len(written["scd"]["psnr_per_frame"]) == 1 and set(written["scd"]) >= {"psnr", "ssim", "psnr_per_frame"}



def test_eval_scores_each_model_at_its_own_samples_unless_told(tmp_path):
    """A folder that defaults to 3 samples per frame is scored at 3, as --samples 3 scores a plain one."""
    from scd.checkpoints import load_model_folder

    world = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8)
    plain = load_model_folder(save_model_folder(random_model(tiny_config(**world)), tmp_path / "plain"))
    three = load_model_folder(save_model_folder(random_model(tiny_config(default_samples=3, **world)), tmp_path / "three"))
    told = evaluate({"scd": plain}, clips=2, context=3, frames=3, steps=2, samples=3)
    own = evaluate({"scd": three}, clips=2, context=3, frames=3, steps=2)
    one = evaluate({"scd": three}, clips=2, context=3, frames=3, steps=2, samples=1)
    assert told["scd"]["samples"] == own["scd"]["samples"] == 3 and one["scd"]["samples"] == 1
    assert told["scd"]["psnr_per_frame"] == own["scd"]["psnr_per_frame"] != one["scd"]["psnr_per_frame"]


RECORDED = Path(__file__).parent / "fixtures" / "eval_embedded.json"


def test_eval_reproduces_the_recorded_numbers_of_the_shipped_models(tmp_path):
    """The embedded models score what was recorded when they were shipped (generation is seeded, so
    only float rounding across CPUs may move it). Re-record after shipping new weights with
    `scd eval --clips 8 --frames 8 --threads 1 --json tests/fixtures/eval_embedded.json`."""
    recorded = json.loads(RECORDED.read_text())
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--clips", str(recorded["clips"]), "--frames", str(recorded["frames"]),
                            "--context", str(recorded["context"]), "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    now = json.loads(out.read_text())
    for name in ("scd", "baseline", "copy_last_frame", "object_free"):
        assert abs(now[name]["psnr"] - recorded[name]["psnr"]) < 0.05, name
        assert np.allclose(now[name]["psnr_per_frame"], recorded[name]["psnr_per_frame"], atol=0.2), name
        hits, then = now[name]["objects"]["agent"]["hit_rate"], recorded[name]["objects"]["agent"]["hit_rate"]
        assert np.abs(np.array(hits) - np.array(then)).max() <= 1 / recorded["clips"] + 1e-9, name


def test_horizons_report_objects_at_set_frames_and_psnr_over_spans():
    from scd.evaluate import horizons

    psnr = list(np.arange(1, 131, dtype=float))  # frame u scores u dB
    objects = {"agent": {"hit_rate": [1.0] * 127 + [0.5] * 3}, "red_ball": {"hit_rate": [0.25] * 130}}
    h = horizons(psnr, objects)
    assert list(h["hit_rate_at"]) == ["1", "8", "16", "64", "128"]
    assert h["hit_rate_at"]["128"] == {"agent": 0.5, "red_ball": 0.25} and h["hit_rate_at"]["16"]["agent"] == 1.0
    assert h["psnr_over"] == {"1-16": 8.5, "17-64": 40.5, "65-128": 96.5, "129-130": 129.5}


def test_eval_scores_the_long_horizon_against_the_object_free_scene(tmp_path):
    from scd.checkpoints import load_model_folder

    world = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8)
    loaded = load_model_folder(save_model_folder(random_model(tiny_config(**world)), tmp_path / "m"))
    result = evaluate({"scd": loaded}, clips=1, context=3, frames=20, steps=1)
    margin = result["scd"]["margin_over_object_free"]
    p, floor = np.array(result["scd"]["psnr_per_frame"]), np.array(result["object_free"]["psnr_per_frame"])
    worst = min((p[:16] - floor[:16]).mean(), (p[16:] - floor[16:]).mean())
    assert margin["worst_16_frames_db"] == pytest.approx(worst, abs=1e-3) and margin["worst_block_starts_at"] in (1, 17)
    assert set(result["scd"]["horizons"]["psnr_over"]) == {"1-16", "17-20"}


def record_truth(tmp_path, seed: int = 3, frames: int = 40, erase_red_at: int | None = None, keep_pngs: bool = True):
    """A recording of a perfect world model: the Recorder fed the simulator's own frames for a
    scripted player's actions (optionally with the red ball erased from one frame)."""
    from scd.checkpoints import load_model
    from scd.play import Recorder, prompt_frames

    loaded = load_model(None, arch="scd")
    tmp_path.mkdir(parents=True, exist_ok=True)
    context, context_actions = prompt_frames(loaded, None, seed)
    actions = world.random_actions(9, frames)
    truth = world.render_clip(world.HELDOUT_SEED_START + seed, len(context) + frames,
                              np.array(context_actions + actions.tolist()))[0][len(context):]
    scene = world.render_clip(world.HELDOUT_SEED_START + seed, len(context) + frames,
                              np.array(context_actions + actions.tolist()), objects=False)[0][len(context):]
    recorder = Recorder(tmp_path / "play.mp4", loaded, None, seed, 4, 3, frames_dir=tmp_path / "frames" if keep_pngs else None)
    for j, (frame, action) in enumerate(zip(truth, actions)):
        if j + 1 == erase_red_at:
            red = (np.abs(frame.astype(int) - world.OBJECT_COLORS["red_ball"]) <= world.TOLERANCE).all(-1)
            frame = np.where(red[..., None], scene[j], frame)
        recorder.add(frame, None if action == world.NULL_ACTION else int(action))
    recorder.close()
    return tmp_path / "play.mp4"


def test_a_recorded_play_is_scored_against_the_world_it_played(tmp_path):
    from scd.evaluate import score_recording

    perfect = score_recording(record_truth(tmp_path / "a"))
    assert perfect["frames"] == 40 and not perfect["lossy"] and perfect["first_lost_at"] == dict.fromkeys(world.OBJECT_COLORS)
    assert list(perfect["spans"]) == ["1-16", "17-40"]
    for span in perfect["spans"].values():
        assert span["psnr"] == 100.0 and span["object_free_psnr"] < 30
        assert all(v in (1.0, None) for v in span["kept"].values())
    # a ball missing from one frame is lost there, and only that frame's share drops
    broken = score_recording(record_truth(tmp_path / "b", erase_red_at=21))
    assert broken["first_lost_at"]["red_ball"] == 21 and broken["first_lost_at"]["agent"] is None
    assert broken["spans"]["1-16"]["kept"]["red_ball"] == 1.0 and broken["spans"]["17-40"]["kept"]["red_ball"] < 1.0
    assert broken["psnr_per_frame"][20] < 100 and broken["psnr_per_frame"][19] == 100
    # from the MP4 alone (lossy colour), through the command
    mp4_only = record_truth(tmp_path / "c", keep_pngs=False)
    r = runner.invoke(app, ["eval", "--recording", str(mp4_only.with_suffix(".json")), "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert "against the world it played" in r.output and "4:2:0" in r.output
    scored = json.loads((tmp_path / "s.json").read_text())
    assert scored["lossy"] and scored["spans"]["1-16"]["psnr"] > 25 and scored["spans"]["1-16"]["kept"]["agent"] == 1.0
    # a recording made with relative paths and moved elsewhere is read from beside its JSON
    moved = tmp_path / "moved"
    moved.mkdir()
    meta = json.loads(mp4_only.with_suffix(".json").read_text())
    for key in ("video", "actions"):
        (moved / Path(meta[key]).name).write_bytes(Path(meta[key]).read_bytes())
        meta[key] = f"somewhere/{Path(meta[key]).name}"
    (moved / "play.json").write_text(json.dumps(meta))
    assert score_recording(moved / "play.json")["spans"] == scored["spans"]


def test_a_recording_that_cannot_be_scored_is_a_one_line_error(tmp_path):
    record = record_truth(tmp_path, frames=4)
    meta = json.loads(record.with_suffix(".json").read_text())
    cases = {"missing.mp4": "does not exist"}
    for name, change, message in (("prompted", {"prompt": "clip.mp4"}, "only a play of a synthetic-world clip"),
                                  ("old", {"prompt_frames": None}, "recorded by an earlier scd"),
                                  ("other", {"seed": None, "actions": None}, "not a recording's JSON")):
        edited = {k: v for k, v in {**meta, **change}.items() if v is not None or k == "prompt"}
        (tmp_path / f"{name}.json").write_text(json.dumps(edited))
        cases[f"{name}.mp4"] = message
    (tmp_path / "garbage.json").write_text("{not json")
    cases["garbage.json"] = "is not a recording's JSON"
    for name, message in cases.items():
        r = runner.invoke(app, ["eval", "--recording", str(tmp_path / name)])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (name, r.output)
    r = runner.invoke(app, ["eval", "--recording", str(record), "--model", "x"])
    assert r.exit_code == 2 and "drop --model" in r.output
    r = runner.invoke(app, ["play", "--record-frames", str(tmp_path / "f")])
    assert r.exit_code == 2 and "give --record too" in r.output
