"""Peak memory of long generation with a rolling context window: 100 vs 1,000 frames.

    python benchmarks/memory_flat.py            # prints a table; each run in its own process

Each measurement runs `scd generate` with the embedded model in a fresh process, which reports
its own peak resident set size (ru_maxrss).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = [(100, 16), (1000, 16), (100, None), (1000, None)]


CHILD = """
import resource, sys
from scd_cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(frames: int, window) -> float:
    """Peak RSS of one generate run, measured inside a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["generate", "--frames", str(frames), "--steps", "2", "--quiet", "--out", str(Path(tmp) / "o.mp4")]
        if window:
            args += ["--context-window", str(window)]
        out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True).stdout
        return int(out.split()[-1]) / 1024.0


if __name__ == "__main__":
    print("| frames | context window | peak RSS (MiB) |\n| --- | --- | --- |")
    for frames, window in RUNS:
        print(f"| {frames} | {window or 'none'} | {peak_rss_mib(frames, window):.0f} |", flush=True)
