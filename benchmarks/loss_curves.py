"""Training-loss curves of `scd train` runs, from each run's losses.csv, on one plot.

    python benchmarks/loss_curves.py NAME=RUN_DIR_OR_CSV ... --out curves.png [--window 50]

Each curve is the moving average of the per-step loss over `window` steps. Needs matplotlib.
"""

import argparse
import csv
from pathlib import Path


def read_losses(path: Path) -> list[float]:
    path = path / "losses.csv" if path.is_dir() else path
    with open(path, newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=PATH (a run folder or its losses.csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--log", action="store_true", help="logarithmic loss axis")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in args.runs:
        name, _, path = spec.partition("=")
        losses = moving_average(read_losses(Path(path)), args.window)
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {args.window} steps)")
    if args.log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
