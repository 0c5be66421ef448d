"""How close few-step samples come to a teacher's many-step ones, on held-out world clips.

    python benchmarks/distill_gap.py STUDENT [--teacher scd/assets/world-scd] [--steps 2] [--teacher-steps 4]

Under teacher forcing (the true frames as context, as `scd train --distill-from` trains), every
frame after the first of `--clips` held-out clips is sampled from the same held-out noise by the
teacher at `--teacher-steps` (the target) and at `--steps`, and by the student at `--steps`; prints
each one's mean squared error to the target and its PSNR against it (pixel models, range [-1, 1]).
"""

import argparse
import math

import torch

from scd import world
from scd.checkpoints import load_model
from scd.distill import TrajectoryDistillation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("student")
    parser.add_argument("--teacher", default="scd/assets/world-scd")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--teacher-steps", type=int, default=4)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=4)
    args = parser.parse_args()
    teacher, student = load_model(args.teacher), load_model(args.student)
    video, actions = next(world.stream_batches(world.HELDOUT_SEED_START, args.clips, args.frames))
    noise = torch.randn(args.clips, args.frames - 1, *video.shape[2:], generator=torch.Generator().manual_seed(0))
    objective = TrajectoryDistillation(teacher.model, args.steps, args.teacher_steps)
    print(f"| sampler | MSE to the teacher at {args.teacher_steps} steps | PSNR against it (dB) |")
    print("| --- | ---: | ---: |")
    for name, model in ((f"teacher at {args.steps} steps", load_model(args.teacher).model),
                        (f"student at {args.steps} steps", student.model)):
        mse = objective.gap(model, video, actions, noise)
        print(f"| {name} | {mse:.6f} | {10 * math.log10(4 / mse):.2f} |")


if __name__ == "__main__":
    main()
