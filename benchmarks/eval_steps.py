"""Quality and latency of a world model at several decoder step counts (for model cards).

    python benchmarks/eval_steps.py [MODEL] [--arch scd|baseline] [--steps 4,8,16,50] [--clips 16]

For each step count: `scd eval`'s PSNR / SSIM on held-out clips (8 context frames, 8 generated),
and the median per-frame latency of streaming one clip at batch 1 on this machine's CPU.
Prints a Markdown table.
"""

import argparse
import statistics

import torch

from scd import world
from scd.checkpoints import load_model
from scd.codecs import load_codec
from scd.evaluate import evaluate
from scd.sampling import stream
from scd.video import frames_to_tensor


def latency_ms(loaded, steps: int, frames: int = 8) -> float:
    """Median per-frame latency streaming one held-out clip at batch 1 (the first frame, which
    includes the prefill, is left out)."""
    (clip, actions), = world.heldout_clips(1, 8 + frames)
    codec = load_codec(loaded.config.codec, loaded.folder)
    context = codec.encode(frames_to_tensor(clip[:8]))[None]
    times = [f.latency_ms for f in stream(loaded.model, context, frames, steps, conditions=torch.from_numpy(actions)[None],
                                          window=loaded.config.context_frames, clamp=codec.clamp)]
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--arch", default="scd")
    parser.add_argument("--steps", default="4,8,16,50")
    parser.add_argument("--clips", type=int, default=16)
    args = parser.parse_args()
    loaded = load_model(args.model, arch=args.arch)
    print("| decoder steps | PSNR dB | SSIM | latency per frame, batch 1, CPU (ms) |\n| ---: | ---: | ---: | ---: |")
    for steps in [int(s) for s in args.steps.split(",")]:
        r = evaluate({"m": loaded}, clips=args.clips, steps=steps)["m"]
        default = " (default)" if steps == loaded.config.default_steps else ""
        print(f"| {steps}{default} | {r['psnr']:.2f} | {r['ssim']:.3f} | {latency_ms(loaded, steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
