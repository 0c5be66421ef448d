"""Where a world model loses a ball in one step: each ball's hit rate (within 2 px of the truth) on
the frame generated from `--context` true frames, split by what the ball is near in the true frame
(the pillar, a wall, the other ball, the agent, or nothing).

    python benchmarks/ball_failures.py [MODEL] [--clips 512] [--context 3] [--samples K]

MODEL: a model folder, or scd / baseline for the embedded ones (default scd). The clips are held
out (seeds from HELDOUT_SEED_START + 10,000), each cut at a random phase of its motion.
"""

import argparse

import numpy as np
import torch

from scd import world
from scd.checkpoints import load_model
from scd.evaluate import rollout

NEAR = 4.5  # px between centroids (columns for the pillar) that count as "near"


def tags(truth: np.ndarray, at: np.ndarray, name: str) -> str:
    """What the ball at `at` (row, col) is near in the true frame (H, W, 3)."""
    found = []
    pillar = np.where((truth[0] == world.PILLAR_COLOR).all(-1))[0].mean()
    if abs(at[1] - pillar) < NEAR:
        found.append("pillar")
    if at.min() < 3.5 or at.max() > world.FRAME_SIZE - 4.5:
        found.append("wall")
    for other in ("red_ball", "green_ball", "agent"):
        if other != name:
            where, seen = world.locate(truth[None], world.OBJECT_COLORS[other])
            if seen[0] and np.abs(where[0] - at).max() < NEAR + 0.5:
                found.append("agent" if other == "agent" else "ball")
    return "+".join(found) or "free"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="scd")
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--context", type=int, default=3)
    parser.add_argument("--samples", type=int, help="samples per frame, their median kept (default: the model's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    rng = np.random.default_rng(5)
    clips = []
    for i in range(args.clips):
        frames, actions = world.render_clip(world.HELDOUT_SEED_START + 10_000 + i, args.context + 1 + int(rng.integers(0, 40)))
        clips.append((frames[-args.context - 1:], actions[-args.context - 1:]))
    samples = args.samples or loaded.config.default_samples
    pred = rollout(loaded, clips, args.context, 1, loaded.config.default_steps, 1.0, 0, samples)[:, 0]
    truth = np.stack([f[args.context] for f, _ in clips])
    counts: dict[str, list[int]] = {}
    for name in ("red_ball", "green_ball"):
        p_at, p_seen = world.locate(pred, world.OBJECT_COLORS[name])
        t_at, t_seen = world.locate(truth, world.OBJECT_COLORS[name])
        hit = p_seen & (np.linalg.norm(p_at - t_at, axis=-1) <= 2)
        for c in np.nonzero(t_seen)[0]:
            entry = counts.setdefault(tags(truth[c], t_at[c], name), [0, 0])
            entry[0] += 1
            entry[1] += int(hit[c])
    total, hits = sum(n for n, _ in counts.values()), sum(h for _, h in counts.values())
    print(f"{args.model}, {samples} samples: one-step ball hit rate {hits / total:.3f} ({total - hits} misses of {total})")
    for key, (n, h) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
        print(f"  {key:22s} {n:5d} balls  {n - h:4d} missed  hit rate {h / n:.2f}")


if __name__ == "__main__":
    main()
