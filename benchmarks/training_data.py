"""Training from latent datasets on this CPU: peak memory against dataset size, and steps/s by
data source (the embedded model's size: width 64, 4 + 2 layers, 64 tokens per frame).

    python benchmarks/training_data.py                 # prints two tables, writes docs/training/data-benchmark.json
    python benchmarks/training_data.py --quick         # a smaller run to try it

Memory: `scd encode` turns N world clips (MP4 files with action files) into a pixel dataset, then
`scd train --data DATASET` runs in a fresh process that reports its own peak resident set size
(ru_maxrss) and its DataLoader workers' (RUSAGE_CHILDREN); once with N clips and once with 10 N.
Steps/s (in rounds over the sources, median of 3, as other jobs share this CPU): the same training loop fed by (a) the world stream, rendered on the fly, (b) the pixel
dataset, (c) DC-AE latents of 64x64 frames read from a latent dataset, (d) the same 64x64 frames
read as pixels and encoded by the DC-AE at every step (what training on pixels through an
autoencoder costs without a latent dataset). The DC-AE is shaped like FAR's 8x ones (stage 0
without layers, ResBlock stages then an EfficientViT stage, 32 latent channels) with random
weights and widths of our choosing: its absolute cost is indicative, the ratio (c) / (d) is the
point.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import resource, sys
import torch
torch.set_num_threads(1)
from scd_cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as exit:
    assert not exit.code, exit.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""

FAR_LIKE_DCAE = {  # 8x: four stages, the first without layers; 32 latent channels
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [64, 128, 256, 256], "decoder_block_out_channels": [64, 128, 256, 256],
    "encoder_layers_per_block": [0, 1, 1, 1], "decoder_layers_per_block": [0, 1, 1, 1],
    "encoder_qkv_multiscales": [[], [], [], []], "decoder_qkv_multiscales": [[], [], [], []],
    "decoder_norm_types": ["batch_norm", "batch_norm", "batch_norm", "rms_norm"],
    "decoder_act_fns": ["relu", "relu", "relu", "silu"],
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
}
TRAIN = dict(steps=1000, batch_size=8, clip_frames=8, lr=1e-3, warmup=100, checkpoint_every=10 ** 9)


def write_world_videos(folder: Path, clips: int, frames: int) -> None:
    from scd import world
    from scd.actions import format_actions
    from scd.mp4 import write_video

    folder.mkdir(parents=True)
    for i in range(clips):
        video, actions = world.render_clip(i, frames)
        write_video(folder / f"clip{i:04d}.mp4", video, fps=8)
        (folder / f"clip{i:04d}.actions.txt").write_text(format_actions(actions.tolist(), world.ACTIONS, len(world.ACTIONS)))


def encode(videos: Path, out: Path, encoding) -> tuple[float, int]:
    from scd import dataset

    began = time.perf_counter()
    report = list(dataset.encode_folder(videos, out, encoding))[-1]
    return time.perf_counter() - began, report.frames


def peak_rss_mib(data: Path, steps: int, workers: int) -> tuple[float, float]:
    """Peak RSS of one `scd train` run and of its DataLoader workers, measured in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["train", "--data", str(data), "--out", str(Path(tmp) / "m"), "--steps", str(steps),
                "--batch-size", "8", "--clip-frames", "8", "--workers", str(workers), "--checkpoint-every", "100000",
                "--decoder-combine", "add"]
        out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True,
                             cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
        own, children = out.split()[-2:]
        return int(own) / 1024.0, int(children) / 1024.0


def steps_per_s(config, batches, steps: int, skip: int = 2) -> float:
    """Steps/s of the training loop after `skip` warm-up steps."""
    from scd import train as training

    settings = training.TrainSettings(**{**TRAIN, "steps": steps})
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for _ in training.train(config, Path(tmp) / "m", settings, batches):
            times.append(time.perf_counter())
    return (len(times) - 1 - skip) / (times[-1] - times[skip])


def embedded_config(**fields):
    from scd.models import ModelConfig

    base = dict(arch="scd", num_heads=4, head_dim=16, channels=3, patch_size=4, rope_axes=(4, 6, 6), layers=6,
                decoder_layers=2, decoder_combine="add", condition="action", num_classes=4,
                action_names=("up", "down", "left", "right"), latent_size=(32, 32), frame_size=(32, 32),
                encoder_noise=0.05, context_frames=7)
    return ModelConfig(**{**base, **fields})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "docs" / "training" / "data-benchmark.json"))
    args = parser.parse_args()
    clips, frames, mem_steps, speed_steps, rounds = (8, 24, 10, 6, 1) if args.quick else (40, 64, 60, 12, 3)
    torch.set_num_threads(1)
    from diffusers import AutoencoderDC

    from scd import data, dataset, world
    from scd.codecs import DCAECodec
    from scd.train import TrainSettings

    result = {"machine": f"{platform.machine()} CPU, 1 thread, torch {torch.__version__}", "memory": [], "speed": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pixels = dataset.pixel_encoding((32, 32), world.ACTIONS)
        for n in (clips, 10 * clips):
            write_world_videos(tmp / f"videos{n}", n, frames)
            seconds, stored = encode(tmp / f"videos{n}", tmp / f"pixels{n}", pixels)
            disk = sum(p.stat().st_size for p in (tmp / f"pixels{n}").glob("shard-*")) / 2 ** 20
            own, workers = peak_rss_mib(tmp / f"pixels{n}", mem_steps, 2)
            row = {"clips": n, "frames": stored, "dataset_mib": round(disk, 1), "encode_s": round(seconds, 1),
                   "in_memory_float32_mib": round(stored * 3 * 32 * 32 * 4 / 2 ** 20, 1),
                   "peak_rss_mib": round(own, 0), "peak_rss_worker_mib": round(workers, 0)}
            result["memory"].append(row)
            print(row, flush=True)

        settings = TrainSettings(**TRAIN)
        big = dataset.LatentDataset(tmp / f"pixels{10 * clips}")
        torch.manual_seed(0)
        autoencoder = AutoencoderDC(**FAR_LIKE_DCAE).eval()
        codec = DCAECodec(autoencoder, 0.2889)
        latent = dataset.Encoding(codec, {"type": "dcae", "scaling_factor": 0.2889, "downsample": 8}, (64, 64), world.ACTIONS)
        encode(tmp / f"videos{clips}", tmp / "latents", latent)
        encode(tmp / f"videos{clips}", tmp / "pixels64", dataset.pixel_encoding((64, 64), world.ACTIONS))
        latents, pixels64 = dataset.LatentDataset(tmp / "latents"), dataset.LatentDataset(tmp / "pixels64")
        pixel_model = embedded_config()
        latent_model = embedded_config(channels=32, patch_size=1, latent_size=(8, 8), frame_size=(64, 64),
                                       codec={"type": "dcae", "scaling_factor": 0.2889, "downsample": 8})

        def through_dcae(start, rank=0, ranks=1):
            """64x64 pixel windows encoded by the DC-AE at every step."""
            for video, actions in data.dataset_batches(pixels64, settings, embedded_config(frame_size=(64, 64), latent_size=(64, 64)), 2)(start):
                b, n = video.shape[:2]
                yield codec.encode(video.flatten(0, 1)).view(b, n, 32, 8, 8).float(), actions

        sources = [("world stream (pixels 32x32, rendered on the fly)", pixel_model, data.world_batches(settings, pixel_model)),
                   ("pixel dataset (uint8 32x32 from disk, 2 workers)", pixel_model, data.dataset_batches(big, settings, pixel_model, 2)),
                   ("DC-AE latent dataset (8x8x32 from disk, 2 workers)", latent_model, data.dataset_batches(latents, settings, latent_model, 2)),
                   ("64x64 pixels through the DC-AE every step", latent_model, through_dcae)]
        # rounds over the sources, so that load from other processes falls on all of them alike
        rates = {name: [] for name, _, _ in sources}
        for _ in range(rounds):
            for name, config, batches in sources:
                rates[name].append(steps_per_s(config, batches, speed_steps))
                print(name, round(rates[name][-1], 2), flush=True)
        for name, config, _ in sources:
            result["speed"].append({"source": name, "tokens_per_frame": config.tokens_per_frame,
                                    "steps_per_s": round(statistics.median(rates[name]), 2),
                                    "rounds": [round(r, 2) for r in rates[name]]})

    print(f"\n{result['machine']}\n")
    print("| clips | frames | dataset on disk (MiB) | the same frames as float32 in memory (MiB) | peak RSS, trainer (MiB) | peak RSS, a worker (MiB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in result["memory"]:
        print(f"| {r['clips']} | {r['frames']} | {r['dataset_mib']} | {r['in_memory_float32_mib']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_worker_mib']:.0f} |")
    print("\n| data source | tokens per frame | steps/s (median of rounds) | rounds |\n| --- | ---: | ---: | --- |")
    for r in result["speed"]:
        print(f"| {r['source']} | {r['tokens_per_frame']} | {r['steps_per_s']} | {' '.join(map(str, r['rounds']))} |")
    if not args.quick:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
