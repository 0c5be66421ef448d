"""Where training batches come from: the synthetic world, or a latent dataset on disk.

A source is a function `batches(start_step, rank=0, ranks=1)` yielding (video (B, N, C, H, W)
float32 latents, conditions (B, N) int64: actions, class labels, or the null index) forever from
step `start_step`; `B` is the batch of one process. Batch contents depend only on (seed, step,
position in the batch of all processes), never on the number of DataLoader workers, so a resumed
run sees what the straight run saw, and under `accelerate launch` process r reads exactly its part
of the batch one process would read with `batch_size * ranks` clips (the noise each process draws
is its own: see docs/training.md, "Many processes").
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from scd.codecs import CODEC_DIR, load_codec
from scd.dataset import LatentDataset, codec_fingerprint
from scd.errors import ConfigError, DataError
from scd.models import ModelConfig
from scd.train import (
    RANK_STRIDE,  # world stream: process r draws clips from seed + r * stride
)


@dataclass
class Source:
    """Training data: the batches, a line for the model card, the codec a trained model carries."""
    batches: Callable
    description: str
    codec_folder: Path | None = None


def world_source(settings, config: ModelConfig) -> Source:
    return Source(world_batches(settings, config), "synthetic world (scd.world), seeds < 1e9")


def dataset_source(dataset: LatentDataset, settings, config: ModelConfig, workers: int = 2, init=None) -> Source:
    """Batches from a latent dataset; `init`, a loaded model being fine-tuned, keeps its own codec
    (after its weights are checked against the dataset's)."""
    codec, codec_folder = None, dataset.codec_folder
    if init is not None and init.folder is not None and (Path(init.folder) / CODEC_DIR).is_dir():
        codec_folder = Path(init.folder) / CODEC_DIR
        codec = load_codec(init.config.codec, init.folder)
    if init is not None and config.condition == "text":  # its base's VAE and text encoder made the dataset, or not
        from scd import text

        identity = text.encoder_identity(init.base(), init.base_revision)
        if dataset.text_encoder is not None and dataset.text_encoder != identity:
            raise DataError(f"the captions of {dataset.folder} were embedded by another text encoder than the one of "
                            f"{init.source}'s base: encode the videos through this model (encoding_for with model)")
        codec = init.codec
    check_fits(dataset, config, codec)
    return Source(dataset_batches(dataset, settings, config, workers), f"latent dataset {dataset.folder} "
                  f"({len(dataset.clips)} clips, {sum(c.frames for c in dataset.clips)} frames)", codec_folder)


def world_batches(settings, config: ModelConfig):
    """Clips of the synthetic world (scd.world), rendered on the fly; pixel-space 32x32 models only."""
    from scd import world

    if tuple(config.frame_size) != (world.FRAME_SIZE, world.FRAME_SIZE) or not config.codec.is_pixel:
        raise ConfigError(f"the synthetic world is {world.FRAME_SIZE}x{world.FRAME_SIZE} pixels: "
                          "train a pixel-space model of that frame size on it")
    return lambda start, rank=0, ranks=1: world.stream_batches(settings.seed + RANK_STRIDE * rank, settings.batch_size,
                                                               settings.clip_frames, start, settings.occlusion_share,
                                                               settings.shift_share, settings.shift_last,
                                                               getattr(config, "sink_frames", 0), settings.sink_scatter,
                                                               settings.pillar_share)


# ----------------------------------------------------------------------------- latent datasets

def model_fields(dataset: LatentDataset) -> dict:
    """The ModelConfig fields a dataset decides for a new model: latent shape, frame size, codec,
    frame rate and conditioning (actions if the clips have them, else class labels, else none)."""
    channels, height, width = dataset.latent_shape
    if dataset.num_actions:
        condition, classes = "action", dataset.num_actions
    elif dataset.labels:
        condition, classes = "label", len(dataset.labels)
    else:
        condition, classes = None, 1
    return dict(channels=channels, latent_size=(height, width), frame_size=dataset.frame_size, codec=dataset.codec,
                fps=dataset.fps, condition=condition, num_classes=classes, action_names=dataset.action_names)


def check_fits(dataset: LatentDataset, config: ModelConfig, codec=None) -> None:
    """Refuse a dataset whose latents or labels mean something else to the model. `codec`: the
    model's loaded codec, compared with the dataset's by its weights."""
    where = dataset.folder
    if config.codec.to_dict() != dataset.codec.to_dict():
        raise DataError(f"the dataset {where} holds latents of codec {dataset.codec.to_dict()} but the model's codec is "
                        f"{config.codec.to_dict()}: encode the videos through the model's codec")
    if codec is not None and dataset.codec_fingerprint is not None and codec_fingerprint(codec) != dataset.codec_fingerprint:
        raise DataError(f"the dataset {where} was encoded by another autoencoder than the model's: "
                        "encode the videos through the model's codec")
    if config.condition == "text":
        if dataset.text_encoder is None:
            raise DataError(f"the dataset {where} has no captions, but the model is conditioned on text: encode "
                            "captioned videos through the model (encoding_for with model; NAME.txt files or captions)")
        if dataset.text_len != config.text_len:
            raise DataError(f"the dataset {where} holds captions of {dataset.text_len} tokens, the model reads "
                            f"{config.text_len}")
        channels, *size = dataset.latent_shape
        if channels != config.channels or not config.accepts_latent_size(tuple(size)):
            raise DataError(f"the dataset {where} holds latents of shape {tuple(dataset.latent_shape)}, which the "
                            f"model ({config.channels} channels, patch {config.patch_size[1:]}) cannot take")
        return
    shape = (config.channels, *config.latent_size)
    if tuple(dataset.latent_shape) != shape:
        raise DataError(f"the dataset {where} holds latents of shape {tuple(dataset.latent_shape)} but the model takes {shape}")
    if config.condition == "action" and not dataset.num_actions and dataset.labels:
        raise DataError(f"the dataset {where} has class labels, not actions, but the model is conditioned on actions")
    if config.condition == "label" and not dataset.labels and dataset.num_actions:
        raise DataError(f"the dataset {where} has actions, not class labels, but the model is conditioned on class labels")
    if config.condition == "action" and dataset.num_actions and dataset.num_actions != config.num_classes:
        raise DataError(f"the dataset {where} has {dataset.num_actions} actions but the model has {config.num_classes}")
    if config.condition == "action" and dataset.action_names and config.action_names and \
            tuple(dataset.action_names) != tuple(config.action_names):
        raise DataError(f"the dataset {where} has actions {list(dataset.action_names)} but the model's are "
                        f"{list(config.action_names)}")
    if config.condition == "label" and dataset.labels and len(dataset.labels) != config.num_classes:
        raise DataError(f"the dataset {where} has {len(dataset.labels)} classes but the model has {config.num_classes}")


class ClipWindows(torch.utils.data.Dataset):
    """Item i is the clip window of position i % global_batch in the batch of step i // global_batch,
    drawn from (seed, step, position) alone: a clip uniformly among those long enough, then a start."""

    def __init__(self, dataset: LatentDataset, clip_frames: int, global_batch: int, seed: int, config: ModelConfig):
        self.dataset, self.clip_frames, self.global_batch, self.seed = dataset, clip_frames, global_batch, seed
        self.condition, self.null = config.condition, config.null_class
        self.eligible = [i for i, c in enumerate(dataset.clips) if c.frames >= clip_frames]
        if not self.eligible:
            raise DataError(f"no video in {dataset.folder} has at least {clip_frames} frames: use shorter clips "
                            "(clip_frames) or longer videos", "clip_frames")

    def __len__(self) -> int:
        return 2 ** 62  # endless: the sampler decides which items are read

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, position = divmod(int(index), self.global_batch)
        rng = np.random.default_rng([self.seed, step, position])
        clip = self.eligible[int(rng.integers(len(self.eligible)))]
        first = int(rng.integers(self.dataset.clips[clip].frames - self.clip_frames + 1))
        return self.dataset.window(clip, first, self.clip_frames, self.condition, self.null)


class StepSampler(torch.utils.data.Sampler):
    """From `start` on, forever: the items of process `rank`'s part of each step's global batch."""

    def __init__(self, start: int, batch_size: int, rank: int, ranks: int):
        self.start, self.batch_size, self.rank, self.ranks = start, batch_size, rank, ranks

    def __iter__(self):
        for step in itertools.count(self.start):
            base = (step * self.ranks + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)


def dataset_batches(dataset: LatentDataset, settings, config: ModelConfig, workers: int = 2):
    """Batches of clip windows read from `dataset` by a DataLoader with `workers` processes."""
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}", "workers")
    check_fits(dataset, config)
    ClipWindows(dataset, settings.clip_frames, settings.batch_size, settings.seed, config)  # fail early

    def batches(start: int, rank: int = 0, ranks: int = 1):
        windows = ClipWindows(dataset, settings.clip_frames, settings.batch_size * ranks, settings.seed, config)
        loader = torch.utils.data.DataLoader(
            windows, batch_size=settings.batch_size, sampler=StepSampler(start, settings.batch_size, rank, ranks),
            num_workers=workers, pin_memory=torch.cuda.is_available(),
            # its own generator: creating the loader must not draw from the global RNG that resume restores
            generator=torch.Generator().manual_seed(settings.seed),
            prefetch_factor=4 if workers else None)
        try:
            yield from loader
        except DataError as err:  # from a worker: torch's message holds the worker's whole traceback
            message = worker_message(err)
            raise DataError(message, err.parameter or ("skip_bad_shards" if "skip_bad_shards" in message else None)) from None

    return batches


def worker_message(err: DataError) -> str:
    """The worker's own one-line message out of torch's "Caught DataError in DataLoader worker
    process 0. Original Traceback ..." (the error itself, unchanged, when it is not a worker's)."""
    text = str(err)
    if "DataLoader worker" not in text:
        return text
    return text.rsplit("DataError: ", 1)[-1].strip().splitlines()[0]
