"""`scd play` in a real browser: Debian's chromium driven by Playwright presses keys on the page and
the embedded world's agent moves that way (checked against the world's ground truth), both panels
advance, the page shows the model's exact pixels, and the recording replays bit-exactly through
`scd generate`. Skips only where chromium is missing and CI is not set; in CI it must run."""

import os
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from typer.testing import CliRunner

from scd import world
from scd.actions import parse_actions
from scd.checkpoints import load_model
from scd.play import Session
from scd.play_server import PlayServer
from scd_cli.app import app
from scd_cli.play import replay_command

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync"]
SEED = 23  # a held-out clip whose agent the embedded model follows within 1 px, right or down, for 8 frames
RIGHT, DOWN = 3, 1


def _playwright():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture
def page():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 800})
        finally:
            browser.close()


@pytest.fixture
def server(tmp_path):
    session = Session([load_model(), load_model("baseline")], seed=SEED, record=tmp_path / "play.mp4",
                      record_frames=tmp_path / "shown", paused=True, format_replay=replay_command)
    server = PlayServer(session, port=0, linger_s=0.5)
    server.start()
    yield server
    server.stop()


SHOWN_JS = """(panel) => {
  const canvas = document.querySelector(`#panel-${panel} canvas`);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  return {index: Number(canvas.dataset.index), episode: Number(canvas.dataset.episode),
          width: canvas.width, height: canvas.height, rgba: Array.from(data)};
}"""


def shown(page, panel: int):
    """The frame panel `panel` shows now: (episode, index, (H, W, 3) uint8)."""
    got = page.evaluate(SHOWN_JS, panel)
    pixels = np.array(got["rgba"], np.uint8).reshape(got["height"], got["width"], 4)[..., :3]
    return got["episode"], got["index"], pixels


def agent(frame: np.ndarray) -> tuple[float, float]:
    """The agent's centroid (row, col) in a (H, W, 3) frame, by the world's own tracker; it must be visible."""
    (at,), (visible,) = world.locate(frame[None], world.OBJECT_COLORS["agent"])
    assert visible, "no agent in the frame"
    return float(at[0]), float(at[1])


def wait_for_frames(page, episode: int, index: int) -> None:
    """Until both panels show a frame of `episode` at or past `index` (the baseline at or past 1)."""
    page.wait_for_function(
        """([episode, index]) => [0, 1].every((p) => {
             const canvas = document.querySelector(`#panel-${p} canvas`);
             return canvas && Number(canvas.dataset.episode) === episode && Number(canvas.dataset.index) >= (p ? 1 : index);
           })""", arg=[episode, index], timeout=15000)


def drive(page, key: str, episode: int):
    """Hold `key` while the paused play resumes for a few frames; pause, release; the frame shown."""
    page.keyboard.down(key)
    page.keyboard.press(" ")  # resume: the first frame already takes the held key
    wait_for_frames(page, episode, 2)
    page.keyboard.press(" ")  # pause before the key is released: every frame of the episode took it
    page.keyboard.up(key)
    return shown(page, 0)


def test_keys_drive_the_world_both_panels_advance_and_the_recording_replays(server, page, tmp_path):
    page.goto(server.url)
    page.wait_for_selector("#panel-1")
    assert page.inner_text("#panel-0 .name").startswith("SCD")
    assert page.inner_text("#panel-1 .name").startswith("causal baseline")
    c = load_model().config
    caption = f"{c.default_steps} steps" + (f", median of {c.default_samples}" if c.default_samples > 1 else "")
    assert page.inner_text("#panel-0 .steps") == page.inner_text("#panel-1 .steps") == caption
    assert "up" in page.inner_text("#actions") and "right" in page.inner_text("#actions")

    context = load_model().config.context_frames  # the prompt play starts from: the model's context length
    prompt, prompt_actions = world.render_clip(world.HELDOUT_SEED_START + SEED, context)
    start = agent(prompt[-1])

    def truth(actions: list[int], index: int) -> tuple[int, int]:
        frames, _ = world.render_clip(world.HELDOUT_SEED_START + SEED, context + index + 1,
                                      np.array(prompt_actions.tolist() + actions[:index + 1]))
        return agent(frames[-1])

    episode, right_index, right_frame = drive(page, "ArrowRight", 1)
    assert episode == 1 and right_index >= 2
    y, x = agent(right_frame)
    assert x - start[1] >= 3 and abs(y - start[0]) <= 2, (start, (y, x))  # it went right
    ty, tx = truth([RIGHT] * (right_index + 1), right_index)
    assert abs(y - ty) <= 2 and abs(x - tx) <= 2, ((ty, tx), (y, x))  # where the world says it is
    baseline_right = shown(page, 1)

    page.keyboard.press("r")  # reset: episode 2 starts again from the prompt, still paused
    page.wait_for_function("() => document.querySelector('#info').textContent.includes('episode 2')")
    episode, down_index, down_frame = drive(page, "ArrowDown", 2)
    assert episode == 2 and down_index >= 2
    y, x = agent(down_frame)
    assert y - start[0] >= 3 and abs(x - start[1]) <= 2, (start, (y, x))  # it went down
    ty, tx = truth([DOWN] * (down_index + 1), down_index)
    assert abs(y - ty) <= 2 and abs(x - tx) <= 2, ((ty, tx), (y, x))
    baseline_down = shown(page, 1)
    assert baseline_down[0] == 2 and baseline_down[1] >= 1 and baseline_right[1] >= 1  # the baseline advanced too
    assert not np.array_equal(baseline_down[2], baseline_right[2])
    for panel in (0, 1):
        assert re.fullmatch(r"\d+\.\d fps", page.inner_text(f"#panel-{panel} .fps"))
        assert re.fullmatch(r"p50 \d+\.\d ms", page.inner_text(f"#panel-{panel} .p50"))

    page.close()  # the last page closed: the play ends by itself
    assert server.wait(timeout=10)
    recordings = server.stop()
    assert [r.video.name for r in recordings] == ["play.mp4", "play-2.mp4"]

    config = load_model().config
    seen = [(right_index, right_frame), (down_index, down_frame)]
    for episode, (recording, action, (index, frame)) in enumerate(zip(recordings, (RIGHT, DOWN), seen), 1):
        recorded = parse_actions(recording.actions, config.action_names, config.num_classes)
        assert recorded == [action] * recording.frames and recording.frames >= 3
        played = sorted((tmp_path / "shown" / f"episode-{episode}").glob("*.png"))
        assert len(played) == recording.frames
        # the page showed the model's exact pixels (lossless PNG)
        assert np.array_equal(iio.imread(played[index]), frame)
        replay_dir = tmp_path / f"replay-{episode}"
        result = CliRunner().invoke(app, recording.replay[1:] + ["--frames-dir", str(replay_dir), "--quiet"])
        assert result.exit_code == 0, result.output
        replayed = sorted(replay_dir.glob("*.png"))
        assert len(replayed) == recording.frames
        for a, b in zip(played, replayed):
            assert np.array_equal(iio.imread(a), iio.imread(b)), (a.name, b.name)
