"""Training and fine-tuning of SCD and the causal baseline on accelerate.

Both models learn the velocity `noise - x0` of every frame given clean earlier frames, exactly the
situation they meet when generating:
- SCD: the encoder runs once, block-causally, over the clean clip (frame j with action j + 1);
  the decoder denoises frame j from the encoder's features of frame j - 1 (with action j), several
  noise draws per encoder pass (the reference's `decoder_multi_batch`), sigma logit-normal.
- Baseline: one pass over [clean frames; noisy frames], where noisy frame j attends to clean
  frames < j and to itself (frame j with action j), so every frame is a target in one pass.
Actions are dropped to the null index for 10% of clips, so guidance has an unconditional model.
Checkpoints hold model, EMA, optimizer, step and RNG states, written atomically; `resume`
continues bit-identically because batch k depends only on (seed, k).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from scd.checkpoints import LoadedModel, save_model_folder
from scd.errors import CheckpointError, ConfigError, DataError
from scd.model import Baseline, ModelConfig, SCDModel, block_causal_mask, build_model, patchify, rope_tables, unpatchify
from scd.sampling import add_noise


RANK_STRIDE = 1_000_003  # process r of a multi-process run draws data and noise from seed + r * stride


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 8
    clip_frames: int = 10
    lr: float = 3e-4
    warmup: int = 100
    decay: int = 0  # the learning rate falls linearly to 0 over the last `decay` steps (0: constant to the end)
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    decoder_draws: int = 2
    decoder_lr_ratio: float = 2.0  # the reference trains SCD's decoder at twice the encoder's rate
    sigma_shift: float = 1.0  # > 1 moves the logit-normal noise levels toward sigma 1 (SD3's shift); 1 = the reference
    clean_context_ratio: float = 1.0  # share of SCD context frames the encoder sees clean; the rest noised (reference: 0.1)
    context_sigma_max: float = 1.0  # noised context frames draw sigma from max * logit-normal
    action_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 200


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    steps_per_s: float
    eta_s: float
    main_process: bool = True  # under `accelerate launch`, only the main process should draw


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, constant, then (with `decay`) linear fall to 0 at the last step. A function
    of the step alone, so a run resumed with a longer `steps` and a decay is the straight run."""
    warm = min(1.0, (step + 1) / max(1, settings.warmup))
    if settings.decay <= 0:
        return warm
    return min(warm, max(0.0, (settings.steps - step) / settings.decay))


def logit_normal(n: int, shift: float = 1.0) -> torch.Tensor:
    sigma = torch.sigmoid(torch.randn(n))
    return sigma if shift == 1.0 else shift * sigma / (1 + (shift - 1) * sigma)


def drop_actions(actions: torch.Tensor | None, config: ModelConfig, p: float) -> torch.Tensor | None:
    if actions is None:
        return None
    keep = torch.rand(actions.shape[0], 1) >= p
    return torch.where(keep, actions, torch.full_like(actions, config.null_class))


def noised_context(video: torch.Tensor, clean_ratio: float, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's clean-context ratio: each frame stays clean (timestep -1) with probability
    `clean_ratio`, else it is noised at sigma_max * logit-normal and carries that timestep, so the
    encoder learns to read imperfect context such as its own generated frames. -> (frames, timesteps)."""
    if clean_ratio >= 1.0:
        return video, None
    b, n = video.shape[:2]
    sigma = (sigma_max * logit_normal(b * n)).view(b, n).to(video.device)
    clean = torch.rand(b, n, device=video.device) < clean_ratio
    sigma = torch.where(clean, torch.zeros_like(sigma), sigma)
    noisy = add_noise(video, torch.randn_like(video), sigma)
    return noisy, torch.where(clean, torch.full_like(sigma, -1.0), sigma * 1000.0)


def scd_loss(model: SCDModel, video: torch.Tensor, actions: torch.Tensor | None, draws: int,
             shift: float = 1.0, clean_ratio: float = 1.0, context_sigma_max: float = 1.0) -> torch.Tensor:
    """video (B, N, C, H, W) clean latents; actions (B, N)."""
    b, n = video.shape[:2]
    enc_actions = None if actions is None else torch.cat([actions[:, 1:], actions[:, -1:]], dim=1)
    context, timesteps = noised_context(video, clean_ratio, context_sigma_max)
    features = model.encoder(context, enc_actions, timesteps=timesteps)[:, :-1]  # (B, N-1, T, D): features of frame j-1
    x0 = video[:, 1:].flatten(0, 1).repeat(draws, 1, 1, 1)
    features = features.flatten(0, 1).repeat(draws, 1, 1)
    labels = None if actions is None else actions[:, 1:].flatten().repeat(draws)
    sigma = logit_normal(x0.shape[0], shift).to(x0.device)
    noise = torch.randn_like(x0)
    velocity = model.decoder(add_noise(x0, noise, sigma), sigma * 1000.0, features, labels)
    return F.mse_loss(velocity.float(), (noise - x0).float())


def baseline_loss(model: Baseline, video: torch.Tensor, actions: torch.Tensor | None, shift: float = 1.0) -> torch.Tensor:
    """Every frame j >= 1 denoised against clean frames < j, in one pass."""
    c = model.config
    b, n, _, h, w = video.shape
    t = c.tokens_per_frame
    x0 = video[:, 1:]
    sigma = logit_normal(b * (n - 1), shift).to(video.device).view(b, n - 1)
    noise = torch.randn_like(x0)
    noisy = add_noise(x0, noise, sigma)
    tokens = model.x_embedder(patchify(torch.cat([video, noisy], 1), c.patch_size))  # (B, 2N-1, T, D)
    timesteps = torch.cat([torch.full((b, n), -1.0, device=video.device), sigma * 1000.0], 1)
    labels = None if actions is None else torch.cat([actions, actions[:, 1:]], 1)
    emb = model.conditioning(timesteps, labels)
    frames = torch.cat([torch.arange(n), torch.arange(1, n)]).to(video.device)
    rope = rope_tables(frames, h // c.patch_size, w // c.patch_size, c.rope_axes)
    clean = torch.arange(2 * n - 1, device=video.device) < n
    q, k = frames.repeat_interleave(t), frames.repeat_interleave(t)
    qc, kc = clean.repeat_interleave(t), clean.repeat_interleave(t)
    same = torch.arange(2 * n - 1, device=video.device).repeat_interleave(t)
    # clean queries: clean keys of frames <= theirs; noisy queries: clean keys of earlier frames, and themselves
    mask = (kc[None] & (k[None] <= q[:, None]) & qc[:, None]) | (kc[None] & (k[None] < q[:, None]) & ~qc[:, None])
    mask |= (same[None] == same[:, None]) & ~qc[:, None]
    hidden = model.norm_out(model.run_blocks(tokens, emb, rope, mask), emb)[:, n:]
    velocity = unpatchify(model.proj_out(hidden), c.patch_size, h, w)
    return F.mse_loss(velocity.float(), (noise - x0).float())


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from None


GENERATION_DEFAULTS = ("context_frames", "default_steps", "default_guidance")  # may change on resume


def _check_resumed_config(saved: dict | None, config: ModelConfig, path: Path) -> None:
    """Refuse to resume a checkpoint under a different model config (the same tensors can mean a
    different model, e.g. another decoder combine); generation defaults may change."""
    if saved is None:  # checkpoints from before configs were stored
        return
    now = dataclasses.asdict(config)
    differ = [k for k in sorted(set(saved) | set(now)) if k not in GENERATION_DEFAULTS and saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"{path} was trained with another model config ({shown}): resume with the options it was started with")


def _save_losses(path: Path, losses: list[float]) -> None:
    """The training loss of every step so far as CSV (step,loss), for curves; written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
    os.replace(tmp, path)


def train(config: ModelConfig, out: Path, settings: TrainSettings, batches, init: LoadedModel | None = None,
          resume: bool = False, card=None):
    """Train, yielding Progress after every step; writes `out/checkpoint.pt` and `out/losses.csv`
    periodically and the EMA model folder at the end. `batches(start_step)` yields (video (B, N, C, H, W), actions);
    under `accelerate launch` with several processes it is called as `batches(start_step, rank)`,
    each process trains on its own batches and gradients are averaged (the batch is per process)."""
    from accelerate import Accelerator

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no", cpu=not torch.cuda.is_available())
    rank, ranks = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(settings.seed)
    model = init.model.train() if init is not None else build_model(config).train()  # the same on every process
    config = model.config
    if rank:
        torch.manual_seed(settings.seed + RANK_STRIDE * rank)  # its own noise; rank 0 draws what one process draws
    # No DDP wrapper: the losses reach into submodules, so gradients are averaged across processes by hand.
    model.to(accelerator.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if config.arch == "scd":
        groups = [{"params": list(model.encoder.parameters()), "lr": settings.lr},
                  {"params": list(model.decoder.parameters()), "lr": settings.lr * settings.decoder_lr_ratio}]
    else:
        groups = [{"params": list(model.parameters()), "lr": settings.lr}]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    start, losses, wall_before = 0, [], 0.0  # losses (one per step) and wall time carry through resumes
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.is_file():
            raise CheckpointError(f"nothing to resume: {ckpt} does not exist")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        _check_resumed_config(state.get("config"), config, ckpt)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], accelerator.device)
        start = int(state["step"])
        losses, wall_before = list(state.get("losses", [])), float(state.get("wall_s", 0.0))
    raw = model
    data = batches(start) if ranks == 1 else batches(start, rank)
    began = time.perf_counter()
    for step in range(start, settings.steps):
        video, actions = next(data)
        video = video.to(accelerator.device)
        actions = drop_actions(actions, config, settings.action_dropout)
        actions = None if actions is None or config.condition is None else actions.to(accelerator.device)
        with accelerator.autocast():
            if config.arch == "scd":
                loss = scd_loss(raw, video, actions, settings.decoder_draws, settings.sigma_shift,
                                settings.clean_context_ratio, settings.context_sigma_max)
            else:
                loss = baseline_loss(raw, video, actions, settings.sigma_shift)
        if not torch.isfinite(loss):
            raise DataError(f"the loss became {loss.item()} at step {step}: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if ranks > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            loss = accelerator.reduce(loss.detach(), reduction="mean")
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA forgets the initialisation
        with torch.no_grad():
            for e, p in zip(ema.parameters(), raw.parameters()):
                e.lerp_(p.detach().to(e.dtype), 1 - decay)
        losses.append(loss.item())
        done = step + 1
        rate = (done - start) / (time.perf_counter() - began)
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            if accelerator.is_main_process:
                _save_checkpoint(ckpt, {"model": raw.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                        "rng": torch.get_rng_state(), "step": done, "losses": losses,
                                        "config": dataclasses.asdict(config),
                                        "cuda_rng": torch.cuda.get_rng_state(accelerator.device) if torch.cuda.is_available() else None,
                                        "wall_s": wall_before + time.perf_counter() - began})
                _save_losses(out / "losses.csv", losses)
        yield Progress(done, settings.steps, loss.item(), rate, (settings.steps - done) / rate if rate else 0.0,
                       accelerator.is_main_process)
    if accelerator.is_main_process:
        ema.config = config
        save_model_folder(ema, out, card(losses, wall_before + time.perf_counter() - began) if card else None)


def world_batches(settings: TrainSettings, config: ModelConfig):
    from scd import world

    if tuple(config.frame_size) != (world.FRAME_SIZE, world.FRAME_SIZE) or config.codec.get("type") != "pixel":
        raise ConfigError(f"the synthetic world is {world.FRAME_SIZE}x{world.FRAME_SIZE} pixels: "
                          "train a pixel-space model of that frame size on it")
    return lambda start, rank=0: world.stream_batches(settings.seed + RANK_STRIDE * rank, settings.batch_size,
                                                     settings.clip_frames, start)


VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".gif", ".avi"}


def folder_batches(folder, settings: TrainSettings, config: ModelConfig):
    """Batches from a folder of videos (decoded once through PyAV, fitted to the model's frame
    size), with optional `<name>.actions.txt` beside each clip; windows of `clip_frames` frames
    drawn deterministically from (seed, step). Pixel-space models only."""
    from pathlib import Path

    import numpy as np

    from scd import video
    from scd.generate import parse_actions

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"training data folder {folder} does not exist")
    if config.codec.get("type") != "pixel":
        raise DataError("training on video folders needs a pixel-space model in this version")
    clips = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        frames = video.read_video(path).frames
        if len(frames) < settings.clip_frames:
            continue
        pixels = video.frames_to_tensor(video.fit_frames(frames, config.frame_size))
        sidecar = path.with_suffix(".actions.txt")
        actions = None
        if sidecar.is_file() and config.condition == "action":
            listed = parse_actions(sidecar, config.action_names, config.num_classes)
            actions = torch.tensor((listed + [config.null_class] * len(frames))[:len(frames)])
        clips.append((pixels, actions))
    if not clips:
        raise DataError(f"no video in {folder} has at least {settings.clip_frames} frames")

    def batches(start: int, rank: int = 0):
        step = start
        while True:
            rng = np.random.default_rng([settings.seed, step] + ([rank] if rank else []))
            video_batch, action_batch = [], []
            for _ in range(settings.batch_size):
                pixels, actions = clips[int(rng.integers(len(clips)))]
                first = int(rng.integers(len(pixels) - settings.clip_frames + 1))
                video_batch.append(pixels[first:first + settings.clip_frames])
                action_batch.append(actions[first:first + settings.clip_frames] if actions is not None
                                    else torch.full((settings.clip_frames,), config.null_class))
            yield torch.stack(video_batch), torch.stack(action_batch)
            step += 1

    return batches
