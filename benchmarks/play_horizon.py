"""A long `scd play` without a viewer, scored against the world it played: each embedded model (or
the folders given) plays alone, unpaced, for `--frames` frames, driven by a scripted player
(`scd.world.random_actions`: each action held 2-8 frames, some pauses), recorded with its PNG frames,
then scored by `scd eval --recording` (`scd.evaluate.score_recording`).

    PYTHONPATH=. python benchmarks/play_horizon.py --frames 10000 --out play-horizon [--samples K] [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scd import world
from scd.checkpoints import load_model
from scd.evaluate import score_recording
from scd.play import Session


def play(loaded, frames: int, out: Path, seed: int, samples: int | None = None) -> Path:
    """Play `loaded` for `frames` frames; returns the recording's MP4."""
    record = out / f"{Path(loaded.source.removeprefix('embedded:')).name}-seed{seed}.mp4"
    plan = world.random_actions(seed + 1, frames + 64)
    session = Session([loaded], seed=seed, paced=False, threads=1, record=record, record_frames=out / f"{record.stem}-frames",
                      samples=samples)
    panel, held = session.panels[0], None
    session.start()
    try:
        while panel.frames < frames:
            if session.error is not None:
                raise session.error
            action = int(plan[panel.frames])
            want = None if action == world.NULL_ACTION else action
            if want != held:  # the next frame is made with the key held now
                session.release()
                if want is not None:
                    session.press(want)
                held = want
            time.sleep(0.0005)
    finally:
        session.stop()
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=["scd", "baseline"])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("play-horizon"))
    parser.add_argument("--samples", type=int, help="samples per frame, their median kept (default: each model's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models:
        loaded = load_model(None, arch=name) if name in ("scd", "baseline") else load_model(name)
        t0 = time.perf_counter()
        record = play(loaded, args.frames, args.out, args.seed, args.samples)
        score = score_recording(record)
        score.pop("psnr_per_frame")
        score["wall_s"] = round(time.perf_counter() - t0, 1)
        results[name] = score
        print(name, json.dumps({k: score[k] for k in ("frames", "spans", "first_lost_at",
                                                      "worst_16_frames_vs_object_free_db")}, indent=1))
    (args.out / "scores.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
