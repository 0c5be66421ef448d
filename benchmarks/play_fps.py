"""Sustained frames/s of `scd play`'s frame loop, unpaced, one CPU thread per panel, no viewer.

Each panel's full per-frame work is timed: the rollout step, decoding to pixels, the PNG for the
page. Wall-clock frames/s depends on what else the machine runs, so the panel thread's own CPU time
is read too (Linux: the thread's CPU clock): frames per CPU-second is what one idle core would do.

    PYTHONPATH=. python benchmarks/play_fps.py --seconds 30 [--compare] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from scd.checkpoints import load_model
from scd.play import Session


def thread_cpu_s(thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure(models, seconds: float, steps: int, warmup: float = 3.0) -> list[dict]:
    session = Session(models, steps=steps, paced=False, threads=1)
    session.start()
    try:
        time.sleep(warmup)
        start = [(p.frames, thread_cpu_s(p.thread)) for p in session.panels]
        t0 = time.perf_counter()
        time.sleep(seconds)
        wall = time.perf_counter() - t0
        end = [(p.frames, thread_cpu_s(p.thread)) for p in session.panels]
    finally:
        session.stop()
    rows = []
    for panel, (f0, c0), (f1, c1) in zip(session.panels, start, end):
        frames = f1 - f0
        rows.append({"model": panel.loaded.source, "frames": frames, "wall_s": wall, "cpu_s": c1 - c0,
                     "fps_wall": frames / wall, "fps_per_cpu_second": frames / (c1 - c0)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--compare", action="store_true", help="also both panels at once, as scd play shows them")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    steps = load_model().config.default_steps  # both models at SCD's steps: equal quality (docs/benchmarks.md)
    runs = {"scd alone": [load_model()], "baseline alone": [load_model("baseline")]}
    if args.compare:
        runs["side by side"] = [load_model(), load_model("baseline")]
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
              "steps": steps, "load_before": os.getloadavg(), "runs": {}}
    for name, models in runs.items():
        report["runs"][name] = measure(models, args.seconds, steps)
        for row in report["runs"][name]:
            print(f"{name:15s} {row['model']:18s} {row['fps_wall']:6.1f} frames/s wall   "
                  f"{row['fps_per_cpu_second']:6.1f} frames per CPU-second   ({row['frames']} frames)")
    report["load_after"] = os.getloadavg()
    print(f"load average before {report['load_before'][0]:.1f}, after {report['load_after'][0]:.1f} "
          f"on {os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
