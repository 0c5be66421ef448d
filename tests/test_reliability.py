"""Faults and hostile inputs: interrupted runs keep their work, checkpoints never run code,
corrupt files are one-line errors."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ODD_VALUES, random_model, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scd.actions import parse_actions
from scd.checkpoints import load_model_folder, save_model_folder
from scd.errors import ActionError, VideoError
from scd.mp4 import write_video
from scd.video import read_video


def test_ctrl_c_mid_generation_keeps_a_playable_video_and_an_incomplete_report(tmp_path):
    model = save_model_folder(random_model(tiny_config(latent_size=(8, 8), frame_size=(8, 8))), tmp_path / "m")
    prompt = write_video(tmp_path / "p.mp4", np.full((3, 8, 8, 3), 100, np.uint8), fps=4)
    out, report = tmp_path / "out.mp4", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "scd_cli", "generate", "--model", str(model), "--prompt-frames", str(prompt),
           "--frames", "5000", "--steps", "20", "--out", str(out), "--report", str(report)]
    # a shell running this suite in the background ignores SIGINT for its children: undo that, as a terminal would
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = 0
    for line in proc.stdout:
        if line.startswith("frame "):
            seen += 1
            if seen == 5:
                proc.send_signal(signal.SIGINT)
                break
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    data = json.loads(report.read_text())
    assert data["complete"] is False and data["frames_generated"] >= 5
    assert read_video(out).frames.shape[0] == data["frames_generated"]










@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_random_bytes_as_video_are_a_video_error(tmp_path, data):
    path = tmp_path / "fuzz.mp4"
    path.write_bytes(data)
    try:
        clip = read_video(path)
    except VideoError:
        return
    assert clip.frames.ndim == 4 and clip.frames.shape[-1] == 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10_000))
def test_truncated_video_keeps_decodable_frames_or_errors(tmp_path, cut):
    frames = np.random.default_rng(0).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    path = write_video(tmp_path / "v.mp4", frames, fps=5)
    data = path.read_bytes()
    path.write_bytes(data[: cut % len(data)])
    try:
        clip = read_video(path)
    except VideoError:
        return
    assert 1 <= clip.frames.shape[0] <= 6


@given(st.text(max_size=200))
def test_action_parser_never_crashes(text):
    try:
        actions = parse_actions(text.replace("/", ""), ("up", "down", "left", "right"), 4)
    except ActionError:
        return
    assert all(0 <= a <= 4 for a in actions)


def test_huge_declared_resolution_is_refused_quickly(tmp_path):
    # a PNG header claiming 100000 x 100000 pixels, with no pixel data behind it
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(png)
    with pytest.raises(VideoError):
        read_video(folder)


# ----------------------------------------------------------------------------- fuzzed loaders





@settings(max_examples=60, deadline=None)
@given(st.data())
def test_mutated_options_files_give_a_config_or_a_clear_error(data):
    """Official options YAML with a value replaced by an odd one, or random text."""
    import yaml

    from scd.errors import SCDError
    from scd.reference import config_from_options

    options = yaml.safe_load((Path(__file__).parent / "fixtures/reference/case0/options.yml").read_text())
    if data.draw(st.booleans()):
        node = options["models"]["model_cfg"]["transformer"][data.draw(st.sampled_from(["init_cfg", "decoder_cfg"]))]["config"]
        node[data.draw(st.sampled_from(sorted(node)))] = data.draw(ODD_VALUES)
    else:
        try:
            options = yaml.safe_load(data.draw(st.text(max_size=200)))
        except yaml.YAMLError:
            return
        if not isinstance(options, dict):
            return
    try:
        config = config_from_options(options)
    except SCDError:
        return
    assert config.layers >= 1


def _odd_video(path: Path, kind: str) -> Path:
    """Real files of the kinds readers trip on: 10-bit, variable frame rate, gray, alpha."""
    from test_video import encode

    codec, pix_fmt, suffix = {"10bit": ("ffv1", "yuv420p10le", ".mkv"), "vfr": ("libx264", "yuv420p", ".mp4"),
                              "gray": ("ffv1", "gray", ".mkv"), "alpha": ("png", "rgba", ".mov")}[kind]
    frames = np.random.default_rng(1).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    times = [0, 0.1, 0.15, 0.4, 0.5] if kind == "vfr" else None
    return encode(path.with_suffix(suffix), frames, codec=codec, pix_fmt=pix_fmt, times=times)


@pytest.mark.parametrize("kind", ["10bit", "vfr", "gray", "alpha"])
def test_mutated_odd_videos_decode_or_are_a_video_error(tmp_path, kind):
    """Byte flips across real 10-bit, VFR, gray and alpha files (40 mutants each)."""
    original = _odd_video(tmp_path / "v", kind)
    clip = read_video(original)
    assert clip.frames.shape == (5, 16, 16, 3)
    data = original.read_bytes()
    rng = np.random.default_rng(len(kind))
    for i in range(40):
        mutant = bytearray(data)
        for at in rng.integers(0, len(data), int(rng.integers(1, 9))):
            mutant[at] = int(rng.integers(0, 256))
        path = tmp_path / f"m{i}{original.suffix}"
        path.write_bytes(bytes(mutant))
        try:
            clip = read_video(path)
        except VideoError:
            continue
        assert clip.frames.ndim == 4 and clip.frames.shape[-1] == 3 and clip.frames.dtype == np.uint8






# ----------------------------------------------------------------------------- never destroy a user's file


def _generate_setup(tmp_path):
    model = save_model_folder(random_model(tiny_config(latent_size=(8, 8), frame_size=(8, 8))), tmp_path / "m")
    prompt = write_video(tmp_path / "p.mp4", np.stack([np.full((8, 8, 3), 40 * i, np.uint8) for i in range(5)]), fps=4)
    return model, prompt


def _cli(*args):
    from typer.testing import CliRunner

    from scd_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_prompt_is_never_the_output(tmp_path, monkeypatch):
    """Issue 12.1: `-p out.mp4` with the default --out out.mp4, `-p x -o x`, or a link to the prompt."""
    model, prompt = _generate_setup(tmp_path)
    before = prompt.read_bytes()
    (tmp_path / "link.mp4").symlink_to(prompt)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.mp4").write_bytes(before)
    for extra in (["-p", "out.mp4"], ["-p", prompt, "-o", prompt], ["-p", prompt, "-o", tmp_path / "link.mp4"],
                  ["-p", prompt, "-o", tmp_path / "x.mp4", "--report", prompt]):
        r = _cli("generate", "--model", model, "--frames", 2, *extra)
        assert r.exit_code == 2 and "is the input" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    assert prompt.read_bytes() == before and (tmp_path / "out.mp4").read_bytes() == before
    assert (tmp_path / "link.mp4").is_symlink()


@pytest.mark.parametrize("args, message", [
    (["--context-window", "0"], "window must be >= 1"),
    (["--seed", str(2**64)], "seed must be"),
    (["--seed", "-1"], "seed must be"),
    (["--context", "0"], "context must be >= 1"),
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--fps", "nan"], "fps must be a finite number"),
    (["--threads", "0"], "threads must be >= 1"),
    (["--report", "{tmp}/nodir/r.json"], "does not exist"),
    (["--report", "{tmp}"], "is a folder"),
    (["--frames-dir", "{tmp}/existing.mp4"], "is a file"),
    (["--out", "{tmp}/x.gif"], ".mp4"),
    (["--out", "{tmp}/x.avi"], ".mp4"),
])
def test_a_failed_run_leaves_the_output_untouched(tmp_path, args, message):
    """Issue 12.2 and the options: every bad value is a one-line error before any output is
    opened; what was at --out (a file, or a symlink and its target) is left as it was."""
    model, prompt = _generate_setup(tmp_path)
    target = tmp_path / "target.mp4"
    target.write_bytes(b"the user's video")
    (tmp_path / "existing.mp4").write_bytes(b"the user's other video")
    (tmp_path / "link.mp4").symlink_to(target)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    for out in (tmp_path / "existing.mp4", tmp_path / "link.mp4"):
        r = _cli("generate", "--model", model, "-p", prompt, "--frames", 2, "--out", out, "--steps", 1, *args)
        assert r.exit_code == 2 and message in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert target.read_bytes() == b"the user's video" and (tmp_path / "link.mp4").is_symlink()
    assert (tmp_path / "existing.mp4").read_bytes() == b"the user's other video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.mp4", "link.mp4", "m", "p.mp4", "target.mp4"]


@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_devices_as_output_are_refused_and_survive(tmp_path, device):
    if not Path(device).is_char_device():
        pytest.skip(f"needs {device}")
    model, prompt = _generate_setup(tmp_path)
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 2, "--out", device)
    assert r.exit_code == 2 and "not a regular file" in r.output, r.output
    assert Path(device).is_char_device()


def test_a_run_stopped_before_its_first_frame_leaves_the_old_file(tmp_path):
    """Ctrl-C (or any failure) after the outputs are opened and before the first frame."""
    from scd import generate

    model, prompt = _generate_setup(tmp_path)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"the user's video")
    events = generate.run(generate.Job(load_model_folder(model), out, prompt, frames=3, report=tmp_path / "r.json"))
    assert isinstance(next(events), generate.Started)
    events.close()
    assert out.read_bytes() == b"the user's video"
    assert json.loads((tmp_path / "r.json").read_text())["complete"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out.mp4", "p.mp4", "r.json"]


def test_two_runs_on_one_output_the_second_is_refused(tmp_path):
    """Issue 12.4: the first run holds a lock on --out until it closes; the second stops at once."""
    from scd import generate

    model, prompt = _generate_setup(tmp_path)
    out = tmp_path / "out.mp4"
    first = generate.run(generate.Job(load_model_folder(model), out, prompt, frames=3))
    assert isinstance(next(first), generate.Started)
    assert isinstance(next(first), generate.FrameWritten)
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 2, "--out", out)
    assert r.exit_code == 2 and "being written by another scd run" in r.output, r.output
    summary = [e for e in first if isinstance(e, generate.Finished)][0].summary
    assert summary["complete"] and read_video(out).frames.shape[0] == 3
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 2, "--out", out)  # the lock is free again
    assert r.exit_code == 0 and read_video(out).frames.shape[0] == 2


# ----------------------------------------------------------------------------- signals and partial work


def _interrupt_after(cmd, marker: str, count: int, sig=signal.SIGINT):
    """Run `cmd` (a list after `python -m scd_cli`), send `sig` once `count` output lines start with
    `marker`; returns (exit code, all output)."""
    proc = subprocess.Popen([sys.executable, "-m", "scd_cli", *map(str, cmd)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            # a shell running this suite in the background ignores SIGINT for its children: undo that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, lines = 0, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            seen += 1
            if seen == count:
                proc.send_signal(sig)
                break
    rest = proc.communicate(timeout=120)[0]
    return proc.returncode, "".join(lines) + rest


def test_sigterm_mid_generation_is_handled_as_ctrl_c(tmp_path):
    """What `timeout`, systemd and schedulers send: the video keeps its frames, the report says
    complete: false, exit code 143."""
    model, prompt = _generate_setup(tmp_path)
    out, report = tmp_path / "out.mp4", tmp_path / "r.json"
    code, output = _interrupt_after(["generate", "--model", model, "--prompt-frames", prompt, "--frames", 5000,
                                     "--steps", 20, "--out", out, "--report", report], "frame ", 3, signal.SIGTERM)
    assert code == 143 and "terminated" in output and "Traceback" not in output, output
    data = json.loads(report.read_text())
    assert data["complete"] is False and data["frames_generated"] >= 3 and data["format_version"] == 3
    assert read_video(out).frames.shape[0] == data["frames_generated"]


def _tiny_train_args(out):
    return ["train", "--out", out, "--heads", 2, "--head-dim", 8, "--layers", 2, "--decoder-layers", 1,
            "--patch-size", 8, "--batch-size", 2, "--clip-frames", 3, "--warmup", 2, "--threads", 1]


def test_ctrl_c_in_train_saves_the_last_step_and_says_how_to_resume(tmp_path):
    """Interrupted, train saves the last finished step and prints the --resume hint; resumed, it
    ends bit-identical to a run that was never interrupted."""
    from safetensors.torch import load_file

    code, output = _interrupt_after(_tiny_train_args(tmp_path / "cut") + ["--steps", 500, "--checkpoint-every", 1000],
                                    "step 10/", 1)
    assert code == 130 and "--resume" in output and "Traceback" not in output, output
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"]
    assert 10 <= saved < 500
    r = _cli(*_tiny_train_args(tmp_path / "cut"), "--steps", saved + 2, "--resume")
    assert r.exit_code == 0, r.output
    r = _cli(*_tiny_train_args(tmp_path / "straight"), "--steps", saved + 2)
    assert r.exit_code == 0, r.output
    cut, straight = (load_file(tmp_path / name / "model.safetensors") for name in ("cut", "straight"))
    assert all(torch.equal(cut[k], straight[k]) for k in straight)


def test_train_over_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    assert _cli(*_tiny_train_args(out), "--steps", 2).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _cli(*_tiny_train_args(out), "--steps", 2)
    assert r.exit_code == 2 and "earlier training run" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    said = " ".join(r.output.split())
    assert "continue it (--resume), replace it (--overwrite), or choose another --out folder" in said, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _cli(*_tiny_train_args(out), "--steps", 3, "--overwrite", "--seed", 1)
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("args, message", [
    (["--lr", "-1"], "lr must be > 0"), (["--lr", "nan"], "lr must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"), (["--ema-decay", "2"], "ema-decay must be"),
    (["--seed", str(2**64)], "seed must be"), (["--threads", "0"], "threads must be >= 1"),
])
def test_train_numbers_are_checked_before_anything_is_made(tmp_path, args, message):
    r = _cli(*_tiny_train_args(tmp_path / "new"), "--steps", 2, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "new").exists()


def test_train_out_that_is_a_file_or_read_only_is_refused(tmp_path):
    (tmp_path / "file").write_text("mine")
    r = _cli(*_tiny_train_args(tmp_path / "file"), "--steps", 2)
    assert r.exit_code == 2 and "is a file" in r.output, r.output
    assert (tmp_path / "file").read_text() == "mine"
    if os.geteuid() == 0:  # root writes anywhere but sysfs: read-only (EROFS) or, mounted rw, refusing mkdir (EPERM)
        locked = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    r = _cli(*_tiny_train_args(locked / "run"), "--steps", 2)
    assert r.exit_code == 2 and re.search(r"cannot make the model folder .*: (Permission denied|Read-only|Operation not permitted)",
                                          r.output), r.output


def test_train_and_convert_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert _cli(*_tiny_train_args(tmp_path / "run"), "--steps", 2).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert modes == {name: 0o644 for name in ("checkpoint.pt", "losses.csv", "model.safetensors", "config.json",
                                             "README.md")}, modes


def test_ctrl_c_in_bench_writes_the_rows_measured_so_far(tmp_path):
    model = save_model_folder(random_model(tiny_config()), tmp_path / "m")
    report = tmp_path / "bench.json"
    code, output = _interrupt_after(["bench", "--model", model, "--context", "2,3,4,5,6,7,8,9", "--steps", 2,
                                     "--batch", 1, "--reps", 6, "--frames", 2, "--warmup", 0, "--threads", 1, "--matmul-size", 32,
                                     "--json", report], "context 4", 1)
    assert code == 130 and "Traceback" not in output, output
    data = json.loads(report.read_text())
    contexts = [r["context"] for r in data["rows"]]
    assert data["complete"] is False and contexts == list(range(2, 2 + len(contexts))) and 2 <= len(contexts) < 8


@pytest.mark.parametrize("args, message", [
    (["info", "--steps", "-1"], "steps must be >= 1"),
    (["info", "--context", "-1"], "must be >= 0"),
    (["eval", "--clips", "1", "--frames", "1", "--guidance", "nan"], "guidance must be a finite number"),
    (["eval", "--clips", "1", "--frames", "1", "--seed", str(2**64)], "seed must be"),
    (["eval", "--clips", "1", "--frames", "1", "--steps", "0"], "steps must be >= 1"),
    (["eval", "--clips", "1", "--threads", "0"], "threads must be >= 1"),
    (["eval", "--clips", "1", "--json", "/nonexistent-dir/e.json"], "does not exist"),
    (["bench", "--seed", str(2**64)], "seed must be"),
    (["convert", "{model}", "--out", "{tmp}/c", "--fps", "nan"], "fps must be a finite number"),
    (["convert", "{model}", "--out", "{tmp}/c", "--fps", "inf"], "fps must be a finite number"),
    (["convert", "{model}", "--out", "{tmp}/c", "--scaling-factor", "-1"], "scaling-factor must be > 0"),
])
def test_numbers_of_every_command_are_checked(tmp_path, args, message):
    """Issue 12, options: range, NaN and infinity give a one-line error (exit 2) naming the flag."""
    model = save_model_folder(random_model(tiny_config()), tmp_path / "m")
    r = _cli(*[a.replace("{model}", str(model)).replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- small ones


def test_actions_files_with_a_byte_order_mark_and_errors_that_name_the_file(tmp_path):
    names = ("up", "down", "left", "right")
    path = tmp_path / "a.actions.txt"
    path.write_bytes("\ufeffup\nleft\n".encode("utf-8"))
    assert parse_actions(path, names, 4) == [0, 2]
    path.write_text("up\njump\n")
    with pytest.raises(ActionError, match=f"'jump' in {path}"):
        parse_actions(path, names, 4)


def test_a_short_prompt_action_list_warns(tmp_path):
    model, prompt = _generate_setup(tmp_path)
    (tmp_path / "p.actions.txt").write_text("up\nup\n")  # 2 actions for a 5-frame prompt (3 kept)
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 1, "--out", tmp_path / "o.mp4")
    assert r.exit_code == 0, r.output
    assert "p.actions.txt lists 2 actions but p.mp4 decodes to 5 frames" in " ".join(r.output.split()), r.output
    assert "frames 2-4 take the null action" in " ".join(r.output.split()) and "the last 1" not in r.output




def test_help_shows_text_as_written_and_flags_without_values():
    r = _cli("generate", "--help")
    assert "repo id[@revision]" in r.output and "<bool>" not in r.output


def test_a_non_ascii_path_on_an_ascii_terminal(tmp_path):
    model, prompt = _generate_setup(tmp_path)
    out = tmp_path / "vidéo.mp4"
    proc = subprocess.run([sys.executable, "-m", "scd_cli", "generate", "--model", str(model), "-p", str(prompt),
                           "--frames", "1", "--out", str(out)], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C"}, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")
    assert b"vid\\xe9o.mp4" in proc.stdout and read_video(out).frames.shape[0] == 1


def test_world_models_are_enlarged_for_viewing_by_default(tmp_path):
    r = _cli("generate", "--frames", 1, "--steps", 1, "--out", tmp_path / "w.mp4", "--threads", 1)
    assert r.exit_code == 0, r.output
    assert read_video(tmp_path / "w.mp4").frames.shape == (1, 256, 256, 3)
    r = _cli("generate", "--frames", 1, "--steps", 1, "--out", tmp_path / "s.mp4", "--upscale", 1, "--threads", 1)
    assert r.exit_code == 0 and read_video(tmp_path / "s.mp4").frames.shape == (1, 32, 32, 3)


# ----------------------------------------------------------------------------- issue 26: the prompt's actions


def _numbered_prompt(tmp_path, frames=8, size=8):
    """A prompt whose frame j is gray level 25 j, and a sidecar whose action j is j % 4."""
    clip = np.stack([np.full((size, size, 3), 25 * j, np.uint8) for j in range(frames)])
    prompt = write_video(tmp_path / "clip.mp4", clip, fps=4)
    (tmp_path / "clip.actions.txt").write_text("".join(f"{j % 4}\n" for j in range(frames)))
    return prompt


def test_a_truncated_prompt_keeps_the_actions_of_its_own_frames_and_is_reported(tmp_path):
    """Issue 26.1: `head -c N clip.mp4 > cut.mp4` with the sidecar copied beside it: the frames kept
    get the actions of their own indices (as scd encode pairs them), not the sidecar's last lines."""
    from scd.generate import read_prompt

    _numbered_prompt(tmp_path)
    data = (tmp_path / "clip.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    for size in range(len(data) * 3 // 4, len(data) // 4, -16):  # a cut that leaves 4-7 frames
        cut.write_bytes(data[:size])
        decoded = read_video(cut).frames.shape[0]
        if 4 <= decoded < 8:
            break
    (tmp_path / "cut.actions.txt").write_bytes((tmp_path / "clip.actions.txt").read_bytes())
    model = save_model_folder(random_model(tiny_config(latent_size=(8, 8), frame_size=(8, 8))), tmp_path / "m")
    read = read_prompt(load_model_folder(model), cut)  # the model keeps its last 3 frames
    assert read.actions == [j % 4 for j in range(decoded - 3, decoded)]
    assert read.truncated and any("is truncated" in w and f"{decoded} decodable frames" in w for w in read.warnings)
    assert any(f"lists 8 actions but cut.mp4 decodes to {decoded} frames" in w for w in read.warnings)
    # the CLI says so too
    r = _cli("generate", "--model", model, "-p", cut, "--frames", 1, "--out", tmp_path / "o.mp4", "--threads", 1)
    assert r.exit_code == 0 and "is truncated" in " ".join(r.output.split()), r.output


def test_a_long_sidecar_is_reported_with_both_counts(tmp_path):
    model, prompt = _generate_setup(tmp_path)
    (tmp_path / "p.actions.txt").write_text("up\n" * 7)  # 7 actions for 5 frames
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 1, "--out", tmp_path / "o.mp4", "--threads", 1)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "lists 7 actions but p.mp4 decodes to 5 frames" in said, r.output
    assert "the last 2 actions are not used" in said


def test_a_prompt_without_actions_says_what_none_then_means(tmp_path):
    """Issue 26.2: without a sidecar the prompt's frames take the null action, which the model also
    learned as 'unknown' (actions dropped for guidance), so 'none' need not stand still: say so."""
    model, prompt = _generate_setup(tmp_path)
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 1, "--out", tmp_path / "o.mp4", "--threads", 1)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "the prompt has no actions (no p.actions.txt beside it, no --prompt-actions)" in said, r.output
    assert "'none' afterwards need not stand still" in said
    (tmp_path / "p.actions.txt").write_text("up\n" * 5)
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 1, "--out", tmp_path / "o2.mp4", "--threads", 1)
    assert r.exit_code == 0 and "has no actions" not in r.output and "lists" not in r.output, r.output


def test_extra_actions_are_refused_as_too_few_are(tmp_path):
    model, prompt = _generate_setup(tmp_path)
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 2, "--actions", "up,up,up", "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "3 actions given for 2 frames: give one per generated frame" in r.output, r.output
    assert not (tmp_path / "o.mp4").exists()


def test_the_report_records_the_prompt_and_the_actions_and_counts_from_the_process_start(tmp_path):
    model, prompt = _generate_setup(tmp_path)
    (tmp_path / "p.actions.txt").write_text("up\ndown\nleft\nright\nnone\n")
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "scd_cli", "generate", "--model", str(model), "-p", str(prompt), "--frames", "2",
                           "--actions", "left,none", "--out", str(tmp_path / "o.mp4"), "--report", str(report), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["prompt"] == str(prompt) and data["prompt_frames"] == 3
    assert data["prompt_actions"] == ["left", "right", "none"] and data["actions"] == ["left", "none"]
    assert data["times"]["startup_s"] > 0
    loop_and_before = data["time_to_first_frame_ms"] + 1000 * (data["times"]["startup_s"] + data["times"]["model_load_s"])
    assert data["time_to_first_frame_from_start_ms"] >= loop_and_before


def test_overwriting_an_output_is_said_and_in_the_help(tmp_path):
    model, prompt = _generate_setup(tmp_path)
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    r = _cli("generate", "--model", model, "-p", prompt, "--frames", 1, "--out", out, "--threads", 1)
    assert r.exit_code == 0 and f"{out} exists: it is replaced once the first frame is in" in " ".join(r.output.split()), r.output
    assert "An existing file is replaced" in " ".join(_cli("generate", "--help").output.split())


def test_two_runs_on_one_report_the_second_is_refused(tmp_path):
    from scd.files import OutputLock

    model, prompt = _generate_setup(tmp_path)
    report = tmp_path / "r.json"
    with OutputLock(report, "report"):  # another run writing this report
        r = _cli("generate", "--model", model, "-p", prompt, "--frames", 1, "--out", tmp_path / "o.mp4", "--report", report)
    assert r.exit_code == 2 and "is being written by another scd run" in r.output, r.output
    assert not report.exists() and not (tmp_path / "o.mp4").exists()


def test_a_model_without_a_demo_clip_asks_for_a_prompt_in_plain_words(tmp_path):
    model, _ = _generate_setup(tmp_path)
    r = _cli("generate", "--model", model, "--frames", 1, "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "this model has no demo clip: give --prompt-frames, a video to continue" in r.output, r.output


# ----------------------------------------------------------------------------- issue 26.5: disk full


def _limited_generate(tmp_path, limit: int, *args):
    """scd generate in a child whose files may not grow past `limit` bytes (RLIMIT_FSIZE: a write
    past it fails with EFBIG, as on a full disk; Python ignores SIGXFSZ)."""
    import resource

    model = save_model_folder(random_model(tiny_config(latent_size=(8, 8), frame_size=(8, 8))), tmp_path / "m")
    noise = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    prompt = write_video(tmp_path / "p.mp4", noise, fps=4)
    limit_files = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    cmd = [sys.executable, "-m", "scd_cli", "generate", "--model", str(model), "-p", str(prompt), "--frames", "60",
           "--steps", "1", "--upscale", "16", "--out", str(tmp_path / "o.mp4"), "--threads", "1", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit_files)


def test_a_full_disk_ends_the_video_on_its_last_whole_frame_and_names_it(tmp_path):
    proc = _limited_generate(tmp_path, 12_000, "--report", tmp_path / "r.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot write {tmp_path / 'o.mp4'}" in " ".join(proc.stderr.split()), proc.stderr
    clip = read_video(tmp_path / "o.mp4")
    assert clip.truncated is None  # no box cut short: the file ends on a whole fragment
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["complete"] is False and 1 <= data["frames_generated"] < 60
    assert clip.frames.shape[0] == data["frames_generated"]  # every frame the report counts, none cut short


def test_a_full_disk_names_the_video_first_when_the_report_fails_too(tmp_path):
    proc = _limited_generate(tmp_path, 1_500, "--report", tmp_path / "r.json")
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert said.index(f"cannot write {tmp_path / 'o.mp4'}") < said.index("the report"), said
    assert "could not be written either" in said


# ----------------------------------------------------------------------------- issue 26.3: damaged datasets


def _small_dataset(tmp_path):
    """Four 8-frame 16x16 videos encoded as pixels into a dataset of several shards."""
    from scd import dataset

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        frames = np.stack([np.full((16, 16, 3), 20 + 10 * j + 40 * i, np.uint8) for j in range(8)])
        write_video(videos / f"v{i}.mp4", frames, fps=8)
    out = tmp_path / "ds"
    list(dataset.encode_folder(videos, out, dataset.pixel_encoding((16, 16)), shard_mb=0.005))
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) >= 3 and all(len(s["sha256"]) == 64 for s in index["shards"])
    return out, index


def _damage(folder, index, how):
    path = folder / index["shards"][1]["file"]
    raw = bytearray(path.read_bytes())
    if how == "header":
        raw[10:14] = b"\xff\x00\xff\x00"
    elif how == "data":
        raw[-20] ^= 0xFF
    elif how == "truncated":
        raw = raw[: len(raw) // 2]
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("how, problem", [
    ("header", "its header is damaged"),
    ("truncated", "it is 3132 bytes but the index lists 6264"),
    ("missing", "it cannot be read"),
    ("data", "its bytes differ from the checksum"),
])
def test_a_damaged_shard_stops_training_in_one_line_naming_it(tmp_path, how, problem):
    """Issue 26.3: size and header are checked before the first step; the checksum when a DataLoader
    worker first reads the shard, and the worker's error is the same one line."""
    folder, index = _small_dataset(tmp_path)
    path = _damage(folder, index, how)
    proc = subprocess.run([sys.executable, "-m", "scd_cli", *map(str, _tiny_train_args(tmp_path / "run")), "--data", str(folder),
                           "--steps", "10", "--workers", "2", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=300)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"the dataset shard {path} is damaged: {problem}" in said and "--skip-bad-shards" in said
    assert "DataLoader worker" not in proc.stderr and not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_shards_can_be_skipped_by_name(tmp_path):
    folder, index = _small_dataset(tmp_path)
    path = _damage(folder, index, "data")
    r = _cli(*_tiny_train_args(tmp_path / "run"), "--data", folder, "--steps", 2, "--workers", 0, "--skip-bad-shards")
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and f"skipped the dataset shard {path.name}: its bytes differ from the checksum" in said, r.output
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_dataset_without_checksums_is_still_read(tmp_path):
    from scd.dataset import LatentDataset

    folder, index = _small_dataset(tmp_path)
    for shard in index["shards"]:
        del shard["sha256"]
    (folder / "index.json").write_text(json.dumps(index))
    data = LatentDataset(folder)
    latents, _ = data.window(0, 0, 2, None, 0)
    assert latents.shape == (2, 3, 16, 16) and not data.skipped_shards


# ----------------------------------------------------------------------------- issue 26.6, 26.7, 26.9: scd play


def _play_server(**kwargs):
    from scd.checkpoints import load_model
    from scd.play import Session
    from scd.play_server import PlayServer

    kwargs.setdefault("paced", False)
    server = PlayServer(Session([load_model()], **kwargs), port=0, linger_s=0.3)
    server.start()
    return server


async def _page(server, messages=(), frames=1):
    """Connect as the server's own page, send `messages` (raw text), then read until `frames` frames
    arrived or the socket closed: (frame headers, close code or None)."""
    import aiohttp

    url = server.url.replace("http", "ws") + "ws"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, origin=server.url.rstrip("/")) as ws:
            for text in messages:
                await ws.send_str(text)
            headers = []
            while len(headers) < frames:
                message = await ws.receive(timeout=20)
                if message.type == aiohttp.WSMsgType.BINARY:
                    (length,) = __import__("struct").unpack(">I", message.data[:4])
                    headers.append(json.loads(message.data[4:4 + length]))
                    await ws.send_str(json.dumps({"type": "ack", "panel": headers[-1]["panel"]}))
                elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return headers, ws.close_code
            return headers, None


def test_play_starts_when_the_first_page_connects_not_when_the_server_does(tmp_path):
    """Issue 26.6: a page opened late sees frame 0, and the recording starts with it."""
    import asyncio
    import time

    record = tmp_path / "run.mp4"
    server = _play_server(record=record)
    try:
        time.sleep(1.5)
        assert not server.playing and server.session.panels[0].frames == 0 and not record.exists()
        headers, _ = asyncio.run(_page(server, frames=3))
        assert server.playing and headers[0]["index"] == 0
    finally:
        recordings = server.stop()
    assert recordings and recordings[0].frames >= 3 and read_video(record).frames.shape[0] == recordings[0].frames


@pytest.mark.parametrize("text", ['{"type": "ack", "panel": 1.0}', '{"type": "ack", "panel": true}',
                                  '{"type": "ack", "panel": 99}', '{"type": "pause", "paused": "false"}',
                                  '{"type": "pace", "paced": 0}', '{"type": "press", "action": "up"}',
                                  '{"type": 7}', '[1, 2]', 'not json', '"ack"'])
def test_malformed_play_messages_close_the_socket_cleanly(text, capfd):
    """Issue 26.7: a field of the wrong type never reaches the session (no bool("false") pause) and
    never raises in the server: the socket is closed with 1003 and the play goes on."""
    import asyncio

    server = _play_server()
    try:
        headers, code = asyncio.run(_page(server, [text], frames=50))
        assert code == 1003, (headers, code)
        assert not server.session.controls.paused and server.session.controls.paced is False
        more, _ = asyncio.run(_page(server, frames=2))  # the server still serves
        assert len(more) == 2
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_well_typed_play_messages_still_work():
    import asyncio

    server = _play_server()
    try:
        asyncio.run(_page(server, ['{"type": "pause", "paused": false}', '{"type": "pace", "paced": true}'], frames=1))
        assert not server.session.controls.paused and server.session.controls.paced is True
        asyncio.run(_page(server, ['{"type": "pause", "paused": true}', '{"type": "future-command"}'], frames=0))
        assert server.session.controls.paused
    finally:
        server.stop()


def test_play_serves_no_favicon_without_a_404():
    import urllib.request

    server = _play_server()
    try:
        response = urllib.request.urlopen(server.url + "favicon.ico")
        assert response.status == 204 and response.read() == b""
    finally:
        server.stop()


def test_play_refuses_a_gif_recording_before_it_serves(tmp_path):
    r = _cli("play", "--no-browser", "--port", 0, "--record", tmp_path / "x.gif")
    assert r.exit_code == 2 and "x.gif does not end in .mp4" in r.output and "http://" not in r.output, r.output


# ----------------------------------------------------------------------------- issue 26.8: set-up

ROOT = Path(__file__).resolve().parents[1]


def _setup_dry_run(tmp_path, gpu: bool, **env):
    """scripts/setup.sh as a fresh install would run it (SCD_SETUP_DRY_RUN: pip resolves with
    --dry-run, nothing is installed), on a machine with or without nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = os.pathsep.join([str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                             if not (Path(p) / "nvidia-smi").exists()])
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": path, "PYTHON": sys.executable, "SCD_SETUP_DRY_RUN": "1", **env})


def test_setup_installs_the_cpu_build_of_torch_without_a_gpu_and_works_offline(tmp_path):
    """Issue 26.8: without an NVIDIA GPU the CPU index is asked for explicitly (a plain pin resolves
    to the CUDA wheel on Linux); here, offline with a local CPU wheel, that still succeeds."""
    proc = _setup_dry_run(tmp_path, gpu=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the CPU build of torch==2.13.0 (no NVIDIA GPU found), from https://download.pytorch.org/whl/cpu" in proc.stdout
    proc = _setup_dry_run(tmp_path, gpu=True)
    assert proc.returncode == 0 and "torch: torch==2.13.0 (the default build: CUDA" in proc.stdout, proc.stdout + proc.stderr
    proc = _setup_dry_run(tmp_path, gpu=False, SCD_TORCH="torch==2.13.0")
    assert proc.returncode == 0 and "torch: torch==2.13.0 (SCD_TORCH)" in proc.stdout, proc.stdout + proc.stderr


def test_the_package_metadata_builds_without_a_license_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "-e", str(ROOT), "-v"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "project.license" in line]
    assert not said and "adding license file 'LICENSE'" in proc.stdout + proc.stderr, said


def test_a_failed_download_does_not_suggest_running_download(tmp_path, hub_env):
    hub_env.setenv("HF_HUB_OFFLINE", "1")
    proc = subprocess.run([sys.executable, "-m", "scd_cli", "download", "someone/world-model"], capture_output=True,
                          text=True, timeout=120)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "is not in the local cache" in said, proc.stderr
    assert "scd download" not in said and "copy its Hub cache (HF_HUB_CACHE) here" in said
    # another command still says how to fetch the model beforehand
    r = _cli("generate", "--model", "someone/world-model", "--out", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "run `scd download someone/world-model`" in " ".join(r.output.split()), r.output


def test_train_is_quiet_with_q(tmp_path):
    r = _cli(*_tiny_train_args(tmp_path / "run"), "--steps", 2, "-q")
    assert r.exit_code == 0 and r.output == "", r.output
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_prompt_actions_given_follow_the_same_rule(tmp_path):
    model, prompt = _generate_setup(tmp_path)  # 5 frames, 3 kept
    report = tmp_path / "r.json"
    r = _cli("generate", "--model", model, "-p", prompt, "--prompt-actions", "up,down,left,right", "--frames", 1,
             "--out", tmp_path / "o.mp4", "--report", report, "--threads", 1)
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "--prompt-actions lists 4 actions but p.mp4 decodes to 5 frames" in said, r.output
    assert json.loads(report.read_text())["prompt_actions"] == ["left", "right", "none"]  # frames 2, 3, 4


def test_a_signal_inside_a_held_block_lands_after_it_so_a_training_update_is_never_half_done():
    """The update of a training step runs under scd.interrupts.signals_held: a Ctrl-C in it must wait
    for the update to finish (then the step is saved on the way out, as an interrupt between steps is)."""
    from scd.interrupts import signals_held

    done = []
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell in the foreground gives it
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                signal.raise_signal(signal.SIGINT)
                done.append("after the signal")
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    terms = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
    try:
        with signals_held():
            signal.raise_signal(signal.SIGTERM)
            assert terms == []
        assert terms == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
