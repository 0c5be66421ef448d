"""How a world model's rollouts lose a ball, and how a one-pixel slip in its context moves it.

1. Rollouts: each held-out clip continued 16 frames from 8 true ones (as `scd eval`); for each ball
   lost (not within 2 px of the truth, or gone), how it was lost at the first frame it was: it
   vanished, jumped (more than 3.5 px off at once) or drifted (a small error that grew).
2. One step from the model's window of context frames, the red ball drawn as it is (`none`), or one
   pixel off in the last or the middle context frame (`scd.world.simulate(shifts=)`): how far the generated ball
   lands from the truth. A model that recovers from its own slips lands where the truth is; one
   that extrapolates its context lands one to two pixels off, and the drift starts.

    python benchmarks/ball_drift.py [MODEL] [--clips 64] [--one-step 256]

MODEL: a model folder, or scd / baseline for the embedded ones (default scd).
"""

import argparse

import numpy as np
import torch

from scd import world
from scd.checkpoints import load_model
from scd.evaluate import rollout

JUMP_PX = 3.5
SLIPS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def how_lost(loaded, clips: int) -> dict[str, int]:
    context, frames = 8, 16
    data = world.heldout_clips(clips, context + frames)
    pred = rollout(loaded, data, context, frames, loaded.config.default_steps, 1.0, 0)
    truth = np.stack([f[context:] for f, _ in data])
    kinds = {"vanished": 0, "jumped": 0, "drifted": 0, "kept": 0}
    for name in ("red_ball", "green_ball"):
        color = world.OBJECT_COLORS[name]
        for c in range(clips):
            p_at, p_seen = world.locate(pred[c], color)
            t_at, t_seen = world.locate(truth[c], color)
            error = np.linalg.norm(p_at - t_at, axis=-1)
            lost = t_seen & (~p_seen | (error > 2))
            if not lost.any():
                kinds["kept"] += 1
                continue
            j = int(np.argmax(lost))
            kinds["vanished" if not p_seen[j] else "jumped" if error[j] > JUMP_PX else "drifted"] += 1
    return kinds


def slip_response(loaded, clips: int) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(3)
    context = loaded.config.window
    lengths = [context + 1 + int(rng.integers(0, 30)) for _ in range(clips)]
    out = {}
    for where in ("none", "last", "middle"):
        given, truth = [], []
        for i, n in enumerate(lengths):
            seed = world.HELDOUT_SEED_START + 20_000 + i
            shifts = np.zeros((n, 3, 2), np.int64)
            if where != "none":
                shifts[n - 2 if where == "last" else n - 2 - context // 2, 0] = SLIPS[i % len(SLIPS)]
            given.append(tuple(x[-context - 1:] for x in (world.simulate(seed, n, shifts=shifts).frames, world.render_clip(seed, n)[1])))
            truth.append(world.render_clip(seed, n)[0][-1])
        pred = rollout(loaded, given, context, 1, loaded.config.default_steps, 1.0, 0)[:, 0]
        color = world.OBJECT_COLORS["red_ball"]
        p_at, p_seen = world.locate(pred, color)
        t_at, t_seen = world.locate(np.stack(truth), color)
        both = p_seen & t_seen
        error = np.linalg.norm(p_at - t_at, axis=-1)[both]
        out[where] = {"exact": float((error <= 0.5).sum() / t_seen.sum()),
                      "within_2px": float((error <= 2).sum() / t_seen.sum()), "mean_error_px": float(error.mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="scd")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--one-step", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    kinds = how_lost(loaded, args.clips)
    print(f"{args.model}: {2 * args.clips} balls over 16 frames: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    for where, scores in slip_response(loaded, args.one_step).items():
        print(f"  red ball one pixel off in the {where:6s} context frame: exact {scores['exact']:.2f}, "
              f"within 2 px {scores['within_2px']:.2f}, mean error {scores['mean_error_px']:.2f} px")


if __name__ == "__main__":
    main()
