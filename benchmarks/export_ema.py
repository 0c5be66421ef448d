"""Write the EMA weights of a training checkpoint as a float16 model folder (how the embedded
models are shipped), so a run can be scored mid-way with `scd eval --model/--baseline FOLDER`.

    python benchmarks/export_ema.py RUN/checkpoint.pt OUT_FOLDER [--card RUN/README.md] [--context-frames N] [--samples K]
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from scd.checkpoints import save_model_folder
from scd.models import build_model, config_from_dict


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--card", type=Path, help="a README.md to copy as the model card")
    parser.add_argument("--context-frames", type=int, help="the context window the folder generates with (default: the run's)")
    parser.add_argument("--samples", type=int, help="samples per frame the folder generates with, their median kept (default: the run's)")
    args = parser.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    config = config_from_dict(state["config"])
    if args.context_frames:
        config = dataclasses.replace(config, context_frames=args.context_frames, window=args.context_frames)
    if args.samples:
        config = dataclasses.replace(config, default_samples=args.samples)
    model = build_model(config, init=False)
    model.load_state_dict(state["ema"])
    card = args.card.read_text() if args.card else None
    save_model_folder(model, args.out, card, dtype=torch.float16)
    print(f"step {state['step']}: wrote {args.out}")


if __name__ == "__main__":
    main()
