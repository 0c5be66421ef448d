"""`scd play` without a browser: the server's origin and host checks, frame dropping for a viewer
that does not keep up, a model without actions, recordings, and the command's one-line errors and
clean stop. Real aiohttp clients and a real `scd play` process; the page itself is driven in
test_play_browser.py."""

import asyncio
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import random_model, tiny_config
from PIL import Image
from typer.testing import CliRunner

from scd.checkpoints import load_model, save_model_folder
from scd.errors import ConfigError, ServerError
from scd.mp4 import write_video
from scd.play import Controls, PanelFrame, Session
from scd.play_server import CREDIT, PlayServer, open_play
from scd_cli.app import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def served():
    """The embedded SCD model alone, unpaced (as fast as it goes), on a free port."""
    servers = []

    def start(**kwargs):
        kwargs.setdefault("paced", False)
        server = PlayServer(Session([load_model()], **kwargs), port=0, linger_s=0.3)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def origin(server) -> str:
    return server.url.rstrip("/")


def split_frame(data: bytes) -> tuple[dict, np.ndarray]:
    (length,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + length])
    return header, np.asarray(Image.open(io.BytesIO(data[4 + length:])))


async def _frames(url: str, origin: str, count: int, ack: bool, seconds: float = 20.0):
    """Connect as a page of `origin`; the state message and `count` frames (acknowledging each if `ack`)."""
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url.replace("http", "ws") + "ws", origin=origin) as ws:
            state = json.loads((await ws.receive(timeout=seconds)).data)
            frames = []
            while len(frames) < count:
                message = await ws.receive(timeout=seconds)
                if message.type == aiohttp.WSMsgType.TEXT:
                    continue
                frames.append(split_frame(message.data))
                if ack:
                    await ws.send_json({"type": "ack", "panel": frames[-1][0]["panel"]})
            return state, frames


def test_a_page_of_the_servers_origin_gets_state_and_png_frames(served):
    server = served()
    state, frames = asyncio.run(_frames(server.url, origin(server), 4, ack=True))
    assert state["type"] == "state" and state["panels"][0]["name"] == "embedded:scd"
    assert state["actions"] == ["up", "down", "left", "right"] and state["fps"] == 8.0 and state["seed"] == 0
    assert [h["index"] for h, _ in frames] == sorted(h["index"] for h, _ in frames)
    header, pixels = frames[-1]
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert header["panel"] == 0 and header["latency_ms"] > 0 and header["target_fps"] == 8.0 and not header["paced"]


def test_other_origins_and_hosts_are_refused(served):
    server = served()

    async def handshake(origin_header):
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(server.url.replace("http", "ws") + "ws", origin=origin_header):
                    return 101
            except aiohttp.WSServerHandshakeError as err:
                return err.status

    assert asyncio.run(handshake("http://evil.example")) == 403
    assert asyncio.run(handshake(f"http://localhost:{server.port}.evil.example")) == 403
    assert asyncio.run(handshake(None)) == 403  # browsers always send one
    assert asyncio.run(handshake(origin(server))) == 101
    page = urllib.request.urlopen(server.url).read().decode()
    assert "<title>scd play</title>" in page
    rebound = urllib.request.Request(server.url, headers={"Host": f"attacker.example:{server.port}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(rebound)
    assert err.value.code == 403


def test_a_viewer_that_does_not_acknowledge_gets_the_newest_frames_not_a_queue(served):
    server = served()
    _, frames = asyncio.run(_frames(server.url, origin(server), CREDIT, ack=False))
    assert len(frames) == CREDIT

    async def starve_then_ack():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(server.url.replace("http", "ws") + "ws", origin=origin(server)) as ws:
                got = []
                while len(got) < CREDIT:  # the credit is spent; nothing more arrives ...
                    message = await ws.receive(timeout=20)
                    if message.type == aiohttp.WSMsgType.BINARY:
                        got.append(split_frame(message.data)[0])
                with pytest.raises(asyncio.TimeoutError):
                    while True:
                        message = await ws.receive(timeout=0.6)
                        assert message.type != aiohttp.WSMsgType.BINARY
                generated = server.session.panels[0].frames
                await ws.send_json({"type": "ack", "panel": 0})  # ... until one is shown: then the newest
                while True:
                    message = await ws.receive(timeout=20)
                    if message.type == aiohttp.WSMsgType.BINARY:
                        return got, split_frame(message.data)[0], generated

    got, newest, generated = asyncio.run(starve_then_ack())
    assert generated >= got[-1]["index"] + 5  # the frame loop went on without the viewer
    assert newest["index"] >= generated - 2 and newest["dropped"] >= 3


def test_controls_take_taps_and_held_keys_per_panel():
    controls = Controls(panels=2, seed=0)
    controls.press(3)
    controls.release(3)  # a tap shorter than a frame still reaches each panel once
    assert controls.take_action(0) == 3 and controls.take_action(1) == 3
    assert controls.take_action(0) is None
    controls.press(0)
    controls.press(2)
    assert [controls.take_action(0) for _ in range(2)] == [2, 2]  # the latest held key wins
    controls.release(2)
    assert controls.take_action(0) == 0
    controls.new_episode(seed=9)
    assert controls.take_action(1) is None and controls.seed == 9 and controls.episode == 2


def test_the_page_is_told_when_a_paced_panel_is_not_keeping_up():
    def frame(fps, paced, index=20):
        return PanelFrame(0, 1, index, b"", None, 100.0, 100.0, fps, 8.0, paced)

    assert frame(5.0, paced=True).behind and not frame(7.5, paced=True).behind
    assert not frame(5.0, paced=False).behind  # flat out there is no rate to keep up with
    assert not frame(1.0, paced=True, index=3).behind  # too few frames to say


def test_a_model_without_actions_still_plays(tmp_path):
    config = tiny_config(condition=None, action_names=(), latent_size=(8, 8), frame_size=(8, 8))
    folder = save_model_folder(random_model(config), tmp_path / "free")
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    frames[:, 2:5, 2:5] = 200
    write_video(tmp_path / "prompt.mp4", frames, fps=4)
    server, warnings = open_play(str(folder), port=0, prompt=tmp_path / "prompt.mp4", compare=None)
    assert warnings == [f"{folder} takes no actions: the keys do nothing, frames roll forward with the null action"]
    assert len(server.session.panels) == 1  # no matched baseline
    server.session.pace(False)
    server.session.press(0)  # ignored
    server.start()
    try:
        state, got = asyncio.run(_frames(server.url, origin(server), 3, ack=True))
    finally:
        server.stop()
    assert state["actions"] == [] and state["num_actions"] == 0
    assert all(h["action"] is None for h, _ in got) and got[-1][1].shape == (8, 8, 3)
    with pytest.raises(ConfigError, match="no matched baseline"):
        open_play(str(folder), port=0, prompt=tmp_path / "prompt.mp4", compare=True)
    result = CliRunner().invoke(app, ["play", "--model", str(folder), "--compare", "--no-browser"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {folder} has no matched baseline: play it without --compare"


def test_a_busy_port_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            PlayServer(Session([load_model()]), port=port).start()
        result = CliRunner().invoke(app, ["play", "--no-browser", "--no-compare", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: --port {port} on 127.0.0.1 is already in use: choose another port (0 picks a free one)"
    assert PlayServer(Session([load_model()]), host="0.0.0.0").warnings[0].startswith("listening on 0.0.0.0, not a loopback")


def test_scd_play_serves_records_and_stops_cleanly_on_ctrl_c(tmp_path):
    record = tmp_path / "run.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250"}
    process = subprocess.Popen([sys.executable, "-m", "scd_cli.app", "play", "--no-browser", "--port", "0", "--seed", "5",
                                "--record", str(record)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=tmp_path)
    try:
        line = process.stdout.readline()
        assert "embedded:scd vs embedded:baseline at http://127.0.0.1:" in line, line
        url = line.split(" at ", 1)[1].split()[0]
        assert "<title>scd play</title>" in urllib.request.urlopen(url).read().decode()
        time.sleep(1.0)
        assert not record.exists()  # nothing is generated or recorded before a page connects

        async def watch():  # a page: the play (and its recording) starts with it
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(url.replace("http", "ws") + "ws", origin=url.rstrip("/")) as ws:
                    deadline = time.time() + 20
                    while time.time() < deadline and (not record.exists() or record.stat().st_size < 2000):
                        await asyncio.sleep(0.2)
                    process.send_signal(signal.SIGINT)
                    await asyncio.sleep(0.5)

        asyncio.run(watch())
        out, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert "stopping" in out and "Traceback" not in out
    meta = json.loads(record.with_suffix(".json").read_text())
    frames = meta["frames"]
    window, samples = load_model().config.context_frames, load_model().config.default_samples
    assert frames >= 2 and meta["seed"] == 5 and meta["context_window"] == window
    assert f"recorded {frames} frames to {record}" in out
    assert meta["replay"] == (f"scd generate --model scd --seed 5 --steps 4 --samples {samples} --context-window {window} --actions "
                              f"{record.with_suffix('.actions.txt')} --frames {frames} --upscale 1 --out {tmp_path / 'run-replay.mp4'}")
    lines = [l for l in record.with_suffix(".actions.txt").read_text().splitlines() if not l.startswith("#")]
    assert lines == ["none"] * frames  # nobody pressed a key


def test_a_compiled_session_plays_the_frames_an_eager_one_plays():
    """`scd play --compile`: each panel's stream goes through torch.compile (aot_eager here, quick to
    compile) and shows the same frames as the eager stream, to PNG rounding."""
    import io
    import threading

    from PIL import Image

    from scd.play import Session

    from scd.compiler import compile_counts

    shown, traced = {}, {}
    for compiled in (False, "aot_eager"):
        got, graphs, done = [], [], threading.Event()
        before = compile_counts()["unique_graphs"]  # process-wide: earlier tests' graphs are in it

        def on_frame(frame, got=got, graphs=graphs, done=done, before=before):
            got.append(np.asarray(Image.open(io.BytesIO(frame.png))).astype(int))
            graphs.append(compile_counts()["unique_graphs"] - before)
            if len(got) >= 3:
                done.set()

        loaded = load_model()
        session = Session([loaded], seed=3, paced=False, on_frame=on_frame, compiled=compiled)
        session.start()
        assert done.wait(120)
        session.stop()
        shown[compiled], traced[compiled] = got[:3], (graphs[:3], loaded.model.__dict__.get("_compiled", {}))
    assert traced[False] == ([0, 0, 0], {})  # the eager session compiles nothing
    graphs, calls = traced["aot_eager"]
    # the compiled one traced one graph per compiled call of its model, in its first frame, never again
    assert sorted(name for name, _ in calls) == ["append_frame", "denoise_steps"]
    assert all(call.fallback is None for call in calls.values())
    assert graphs == [len(calls)] * 3, graphs
    for eager, compiled in zip(shown[False], shown["aot_eager"]):
        assert eager.shape == compiled.shape and np.abs(eager - compiled).max() <= 1


def test_a_recording_replaces_an_earlier_one_only_once_it_holds_a_frame(tmp_path):
    from scd.play import Recorder

    loaded = load_model()
    path = tmp_path / "run.mp4"
    earlier = {path.with_suffix(s): f"earlier {s}".encode() for s in (".mp4", ".actions.txt", ".json")}
    for p, data in earlier.items():
        p.write_bytes(data)
    Recorder(path, loaded, None, 0, 4, 3).close()  # stopped before its first frame
    assert all(p.read_bytes() == data for p, data in earlier.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in earlier)  # no temporary left
    recorder = Recorder(path, loaded, None, 0, 4, 3)
    recorder.add(np.zeros((32, 32, 3), np.uint8), 2)
    recording = recorder.close()
    assert recording.frames == 1 and path.with_suffix(".actions.txt").read_text().splitlines()[-1] == "left"
    assert json.loads(path.with_suffix(".json").read_text())["frames"] == 1


def test_frames_are_never_recorded_over_an_earlier_plays(tmp_path):
    from scd.errors import VideoError
    from scd.play import Session

    loaded = load_model()
    frames = tmp_path / "frames"
    (frames / "episode-1").mkdir(parents=True)
    earlier = frames / "episode-1" / "frame_000000.png"
    earlier.write_bytes(b"an earlier play's frame")
    (tmp_path / "a-file").write_text("not a folder")
    for given in (frames, tmp_path / "a-file"):
        with pytest.raises(VideoError, match="not an empty folder"):
            Session([loaded], record=tmp_path / "run.mp4", record_frames=given)
    assert earlier.read_bytes() == b"an earlier play's frame" and not (tmp_path / "run.mp4").exists()
    Session([loaded], record=tmp_path / "run.mp4", record_frames=tmp_path / "new")  # a new folder is fine


def test_a_play_of_a_median_of_samples_replays_frame_for_frame(tmp_path):
    """A session drawing 3 samples per frame shows and records their median; the recording's replay
    command (`scd generate --samples 3 ...`) makes the same frames, bit for bit."""
    import threading

    from scd.play import Session
    from scd_cli.play import replay_command

    done = threading.Event()
    shown = []

    def on_frame(frame):
        shown.append(frame)
        if len(shown) >= 4:
            done.set()

    record = tmp_path / "run.mp4"
    session = Session([load_model()], seed=2, paced=False, on_frame=on_frame, samples=3, record=record,
                      record_frames=tmp_path / "shown", format_replay=replay_command)
    assert session.state()["panels"][0]["samples"] == 3
    session.start()
    assert done.wait(120)
    session.stop()
    (recording,) = session.recordings
    assert "--samples 3" in " ".join(recording.replay)
    result = CliRunner().invoke(app, recording.replay[1:] + ["--frames-dir", str(tmp_path / "replay"), "--quiet"])
    assert result.exit_code == 0, result.output
    played = sorted((tmp_path / "shown").rglob("*.png"))
    replayed = sorted((tmp_path / "replay").glob("*.png"))
    assert len(played) == len(replayed) == recording.frames >= 4
    for a, b in zip(played, replayed):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        Session([load_model()], samples=0)
