"""Where a world model's rollouts first lose each object: continue held-out clips from 8 true frames
and, for each object lost (not within 2 px of the truth while the truth shows it) by the last
frame, say where the true object was over the 3 frames up to the first loss: deep behind the pillar
(one column showing), behind it otherwise, meeting another object, or free.

    python benchmarks/where_lost.py [MODEL] [--clips 32] [--frames 16] [--samples K]

MODEL: a model folder, or scd / baseline for the embedded ones (default scd).
"""

import argparse
import collections

import numpy as np
import torch

from scd import world
from scd.checkpoints import load_model
from scd.evaluate import rollout

CONTEXT = 8
NAMES = ("red_ball", "green_ball", "agent")


def where(clip: world.Clip, k: int, frame: int) -> str:
    """Where object k (red, green, agent) of `clip` was over the 3 frames up to `frame`."""
    track = clip.agent if k == 2 else clip.balls[:, k]
    columns = [int(track[i][1] - clip.pillar) for i in range(max(0, frame - 2), frame + 1)]
    others = [clip.balls[frame, i] for i in range(2) if i != k] + ([clip.agent[frame]] if k < 2 else [])
    meets = any(np.abs(o - track[frame]).max() <= world.BALL for o in others)
    place = ("pillar-deep" if any(c in (-1, 0) for c in columns)
             else "pillar" if any(-world.BALL < c < 3 for c in columns) else "")
    return "+".join(p for p in (place, "meets" if meets else "") if p) or "free"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="scd")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--samples", type=int, help="samples per frame, their median kept (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    samples = args.samples or loaded.config.default_samples
    clips = world.heldout_clips(args.clips, CONTEXT + args.frames)
    pred = rollout(loaded, clips, CONTEXT, args.frames, loaded.config.default_steps, 1.0, 0, samples)
    tally, base = collections.Counter(), collections.Counter()
    for c in range(args.clips):
        clip = world.simulate(world.HELDOUT_SEED_START + c, CONTEXT + args.frames)
        for k, name in enumerate(NAMES):
            p_at, p_seen = world.locate(pred[c], world.OBJECT_COLORS[name])
            t_at, t_seen = world.locate(clip.frames[CONTEXT:], world.OBJECT_COLORS[name])
            lost = np.nonzero(t_seen & (~p_seen | (np.linalg.norm(p_at - t_at, axis=-1) > 2)))[0]
            tally[name, where(clip, k, CONTEXT + int(lost[0])) if len(lost) else "kept"] += 1
            for j in range(CONTEXT, CONTEXT + args.frames):  # how often an object is there at all
                base[where(clip, k, j)] += 1
    print(f"{args.model}, {samples} samples, {args.clips} clips x {args.frames} frames: where each object was first lost")
    for name in NAMES:
        counts = {w: n for (o, w), n in sorted(tally.items(), key=lambda kv: -kv[1]) if o == name}
        print(f"  {name:11s} " + ", ".join(f"{w} {n}" for w, n in counts.items()))
    total = sum(base.values())
    print("  share of all object-frames: " + ", ".join(f"{w} {n / total:.0%}" for w, n in base.most_common()))


if __name__ == "__main__":
    main()
