"""Training and fine-tuning of SCD and the causal baseline on accelerate.

Both models learn the velocity `noise - x0` of every frame given the earlier frames, exactly the
situation they meet when generating; each model owns its loss (`model.loss`, see scd/models/).
Actions are dropped to the null index for 10% of clips, so guidance has an unconditional model.
Checkpoints hold model, EMA, optimizer, step and RNG states, written atomically; `resume`
continues bit-identically because batch k depends only on (seed, k).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scd import checks, files
from scd.checkpoints import save_model_folder
from scd.codecs import CODEC_DIR
from scd.errors import CheckpointError, ConfigError, DataError
from scd.interrupts import signals_held
from scd.loaded import LoadedModel
from scd.models import ModelConfig, Objective, build_model, config_from_dict

RANK_STRIDE = 1_000_003  # process r of a multi-process run draws data and noise from seed + r * stride
MIXED_PRECISION = ("auto", "no", "bf16")


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
    clean_context_ratio: float = 1.0  # share of context frames seen clean (SCD: by its encoder); the rest noised (reference: 0.1)
    context_sigma_max: float = 1.0  # noised context frames draw sigma from max * logit-normal
    action_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 200
    grad_accum: int = 1  # each step's batch runs in this many passes of batch_size / grad_accum clips (less memory)
    mixed_precision: str = "auto"  # bf16 autocast ("auto": on CUDA), or "no"
    rollout_clips: int = 0  # world: clips per step from the model's own rollouts (scd.own_rollouts), beside batch_size true ones
    rollout_horizon: int = 128  # world: the longest of those rollouts, in frames
    object_weight: float = 0.0  # world: extra loss weight where the moving objects are (scd.world.object_weights)
    occlusion_share: float = 0.0  # world: share of each batch's clips that end at an occlusion (scd.world.occlusion_clip)
    pillar_share: float = 0.0  # world: share that end with an object deep behind the pillar (occlusion_clip's `pillar`)
    shift_share: float = 0.0  # world: share whose context draws an object 1 px off (scd.world.shifted_clip)
    shift_last: bool = False  # world: that slip always in the frame before the clip's last (shifted_clip's `last`)
    shift_weight: float = 0.0  # world: extra loss weight on the frame after a slip, near it (scd.world.slip_weights)
    rollout_past_lost_balls: bool = False  # world: rollouts run on past a lost ball, its pixels out of the loss
    sink_scatter: bool = False  # world, a model with sinks: the sink frames draw their objects anywhere (scd.world.sink_frames)
    rollout_scene_psnr: float | None = None  # world, with rollout_past_lost_balls: a rollout restarts when its scene falls below this (dB; None: scd.own_rollouts.SCENE_PSNR)

    def __post_init__(self):
        """Every number in range and finite (ConfigError naming the setting otherwise)."""
        n = checks.number
        for name in ("steps", "batch_size", "checkpoint_every", "decoder_draws"):
            n(name, getattr(self, name), 1, None, integer=True)
        n("clip_frames", self.clip_frames, 2, None, integer=True)
        n("warmup", self.warmup, 0, None, integer=True)
        n("decay", self.decay, 0, self.steps, integer=True)
        n("lr", self.lr, 0, 10, above=True)
        n("ema_decay", self.ema_decay, 0, 1)
        n("grad_clip", self.grad_clip, 0, None, above=True)
        n("decoder_lr_ratio", self.decoder_lr_ratio, 0, None, above=True)
        n("sigma_shift", self.sigma_shift, 0, None, above=True)
        n("clean_context_ratio", self.clean_context_ratio, 0, 1)
        n("context_sigma_max", self.context_sigma_max, 0, 1, above=True)
        n("action_dropout", self.action_dropout, 0, 1)
        checks.seed(self.seed)
        n("grad_accum", self.grad_accum, 1, None, integer=True)
        n("rollout_clips", self.rollout_clips, 0, None, integer=True)
        n("rollout_horizon", self.rollout_horizon, self.clip_frames + 1, None, integer=True)
        n("object_weight", self.object_weight, 0, None)
        n("occlusion_share", self.occlusion_share, 0, 1)
        n("pillar_share", self.pillar_share, 0, 1)
        if self.occlusion_share + self.pillar_share > 1:
            raise ConfigError("occlusion_share and pillar_share are shares of one batch: together at most 1",
                              parameter="pillar_share", others=("occlusion_share",))
        n("shift_share", self.shift_share, 0, 1)
        n("shift_weight", self.shift_weight, 0, None)
        if self.rollout_scene_psnr is not None:
            n("rollout_scene_psnr", self.rollout_scene_psnr, 0, 100, above=True)
        if self.rollout_scene_psnr is not None and not self.rollout_past_lost_balls:
            raise ConfigError("rollout_scene_psnr is when a rollout run on past a lost ball restarts: give rollout_past_lost_balls",
                              parameter="rollout_scene_psnr", others=("rollout_past_lost_balls",))
        if (self.shift_last or self.shift_weight) and not self.shift_share:
            name = "shift_last" if self.shift_last else "shift_weight"
            raise ConfigError(f"{name} shapes the slips of shift_share: give that a share above 0",
                              parameter=name, others=("shift_share",))
        if self.rollout_past_lost_balls and not self.rollout_clips:
            raise ConfigError("rollout_past_lost_balls shapes the model's own rollouts: give rollout_clips N",
                              parameter="rollout_past_lost_balls", others=("rollout_clips",))
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum must divide the batch size ({self.batch_size}), got {self.grad_accum}",
                              parameter="grad_accum")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r} "
                              "(fp16 needs loss scaling, which this loop does not do: use bf16)", parameter="mixed_precision")


EARLIER_RUN = ("checkpoint.pt", "losses.csv", "model.safetensors", "config.json")


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is made: a file or a read-only place at `out`, or an earlier run
    there (its model, checkpoint or losses) unless it is resumed or overwriting was asked for."""
    files.check_output_folder(out, "model folder")
    earlier = [name for name in EARLIER_RUN if (Path(out) / name).exists()]
    if earlier and not (resume or overwrite):
        raise ConfigError(f"{out} holds an earlier training run ({', '.join(earlier)}): continue it (resume), "
                          "replace it (overwrite), or choose another out folder", "resume", ("overwrite", "out"))


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


def drop_actions(actions: torch.Tensor | None, config: ModelConfig, p: float) -> torch.Tensor | None:
    """Conditions replaced by the null one with probability p per clip (for guidance); text
    embeddings are kept as they are."""
    if actions is None or config.condition == "text":
        return actions
    keep = torch.rand(actions.shape[0], 1) >= p
    return torch.where(keep, actions, torch.full_like(actions, config.null_class))


def _save_checkpoint(path: Path, state: dict) -> None:
    files.atomic_write(path, lambda tmp: torch.save(state, tmp), CheckpointError, "checkpoint")


def _optimizer_state(saved: dict, model, path: Path) -> dict:
    """The checkpoint's optimizer state for this model's parameter groups. One written before q, k
    and v became one fused matmul keeps a state per part: their moments are joined into the fused
    parameter's, in the fused order, so the run continues exactly as it would have."""
    groups = [list(part.named_parameters()) for part in model.parts().values()]
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes == [len(g) for g in groups]:
        return saved
    unfused = [[old for name, _ in g for old in _unfused_order(name)] for g in groups]
    if sizes != [len(names) for names in unfused]:
        raise CheckpointError(f"{path}: its optimizer state has {sizes} tensors per parameter group, this model "
                              f"{[len(g) for g in groups]}: it was written for another model")
    state, param_groups, index = {}, [], 0
    for group, names, saved_group in zip(groups, unfused, saved["param_groups"]):
        saved_index = dict(zip(names, saved_group["params"]))
        ids = []
        for name, param in group:
            parts = [saved["state"].get(saved_index[part]) for part in _qkv_parts(name)]
            if all(p is not None for p in parts):  # AdamW's moments, and its step count (a scalar, shared)
                joined = {k: torch.cat([p[k] for p in parts]) if parts[0][k].dim() else parts[0][k] for k in parts[0]}
                if any(v.dim() and v.shape != param.shape for v in joined.values()):
                    raise CheckpointError(f"{path}: its optimizer state for {name} does not fit this model")
                state[index] = joined
            ids.append(index)
            index += 1
        param_groups.append({**saved_group, "params": ids})
    return {"state": state, "param_groups": param_groups}


def _qkv_parts(name: str) -> list[str]:
    """The unfused parameters a fused q/k/v parameter joins (the name itself for any other)."""
    head, fused, leaf = name.rpartition("to_qkv.")
    return [f"{head}to_{part}.{leaf}" for part in "qkv"] if fused else [name]


def _unfused_order(name: str) -> list[str]:
    """Where the unfused layers' parameters stood in `parameters()`: q's weight and bias, then k's,
    then v's, in the fused weight's place."""
    head, fused, leaf = name.rpartition("to_qkv.")
    if not fused:
        return [name]
    return [f"{head}to_{part}.{kind}" for part in "qkv" for kind in ("weight", "bias")] if leaf == "weight" else []


GENERATION_DEFAULTS = ("context_frames", "window", "default_steps", "default_guidance", "default_samples")  # may change on resume
# what a fine-tune (`init`) may change beside them: sinks add a frame to what the model reads, no weight
INIT_CHANGES = (*GENERATION_DEFAULTS, "sink_frames", "sink_distance")


def _check_resumed_config(saved: dict | None, config: ModelConfig, path: Path) -> None:
    """Refuse to resume a checkpoint under a different model config (the same tensors can mean a
    different model, e.g. another decoder combine); generation defaults may change."""
    if saved is None:  # checkpoints from before configs were stored
        return
    try:  # fields added since the checkpoint was written take their defaults, as a config.json's do
        saved = config_from_dict(saved).to_dict()
    except ConfigError as err:
        raise ConfigError(f"{path} holds a model config this scd cannot read: {err}") from None
    now = config.to_dict()
    differ = [k for k in sorted(set(saved) | set(now)) if k not in GENERATION_DEFAULTS and saved.get(k) != now.get(k)]
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"{path} was trained with another model config ({shown}): resume with the options it was started with")


def _save_losses(path: Path, losses: list[float]) -> None:
    """The training loss of every step so far as CSV (step,loss), for curves; written atomically."""
    files.write_text(path, "step,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)),
                     CheckpointError, "losses")


def train(config: ModelConfig, out: Path, settings: TrainSettings, batches, init: LoadedModel | None = None,
          resume: bool = False, card=None, overwrite: bool = False, codec_folder: Path | None = None, loss=None):
    """Train, yielding Progress after every step; writes `out/checkpoint.pt` and `out/losses.csv`
    periodically and the EMA model folder at the end (with a copy of `codec_folder` as its codec/).
    `batches(start_step, rank, ranks)` yields (video (B, N, C, H, W), actions) (scd.data); under
    `accelerate launch` each process trains on its own batches and gradients are averaged (the
    batch is per process); the checkpoint keeps every process's random state.
    An earlier run in `out` is refused unless `resume` or `overwrite`. Interrupted (Ctrl-C, SIGTERM
    as KeyboardInterrupt) between steps' updates, it first saves a checkpoint of the last finished
    step, from which `resume` continues bit-identically.
    `loss(model, video, conditions, objective)` replaces the model's own loss (`model.loss`), e.g.
    few-step distillation (scd.distill); its `key` is kept in the checkpoint, and a resume under
    another is refused."""
    from accelerate import Accelerator

    out = Path(out)
    loss_key = getattr(loss, "key", None)  # what the checkpoint records of the objective (None: the model's own)
    check_out(out, resume, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot make the model folder {out}: {err.strerror or err}") from None
    if overwrite and not resume:  # a stale checkpoint must not be resumed as this run's
        for name in ("checkpoint.pt", "losses.csv"):
            (out / name).unlink(missing_ok=True)
    precision = settings.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # autocast is ours, not accelerate's: its state is one per process and refuses a second precision
    accelerator = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
    autocast = lambda: torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    rank, ranks = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(settings.seed)
    model = init.model.train() if init is not None else build_model(config).train()  # the same on every process
    if init is not None:  # the caller may change what the folder generates with (a longer window), nothing else
        changed = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(model.config, f.name)]
        if set(changed) - set(INIT_CHANGES):
            raise ConfigError(f"the initial model's {', '.join(changed)} cannot change in training", parameter="init")
        model.config = config
        for part in model.parts().values():  # SCD's encoder reads its sinks from its own config
            part.config = config
    config = model.config
    if settings.sink_scatter and not getattr(config, "sink_frames", 0):
        raise ConfigError("sink_scatter shapes the sink frames of a model with attention sinks: give it sink_frames",
                          parameter="sink_scatter", others=("sink_frames",))
    chunk = getattr(config, "chunk_frames", 1)
    if settings.clip_frames % chunk:
        raise ConfigError(f"clip_frames ({settings.clip_frames}) must be a whole number of the model's chunks of {chunk} "
                          "frames", parameter="clip_frames")
    if rank:
        torch.manual_seed(settings.seed + RANK_STRIDE * rank)  # its own noise; rank 0 draws what one process draws
    # No DDP wrapper: the losses reach into submodules, so gradients are averaged across processes by hand.
    model.to(accelerator.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # the reference trains SCD's decoder at a multiple of the encoder's rate
    groups = [{"params": list(part.parameters()), "lr": settings.lr * (settings.decoder_lr_ratio if name == "decoder" else 1.0)}
              for name, part in model.parts().items()]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings))
    start, losses, wall_before = 0, [], 0.0  # losses (one per step) and wall time carry through resumes
    ckpt = out / "checkpoint.pt"
    if resume:
        if not ckpt.is_file():
            raise CheckpointError(f"nothing to resume: {ckpt} does not exist")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        _check_resumed_config(state.get("config"), config, ckpt)
        if state.get("objective") != loss_key:
            raise ConfigError(f"{ckpt} was trained with objective {state.get('objective') or 'flow matching'}, not "
                              f"{loss_key or 'flow matching'}: resume with the options it was started with")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(_optimizer_state(state["optimizer"], model, ckpt))
        schedule.load_state_dict(state["schedule"])
        rngs = state.get("rng_ranks")
        if rngs is not None and len(rngs) == ranks:  # each process continues its own noise
            torch.set_rng_state(rngs[rank])
        elif rank == 0:
            torch.set_rng_state(state["rng"])
        else:  # another number of processes than the checkpoint's: fresh noise for this one, from (seed, rank, step)
            torch.manual_seed(settings.seed + RANK_STRIDE * rank + int(state["step"]))
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], accelerator.device)
        start = int(state["step"])
        losses, wall_before = list(state.get("losses", [])), float(state.get("wall_s", 0.0))
    raw = model
    compute = loss if loss is not None else (lambda model, video, conditions, objective, **extra:
                                             model.loss(video, conditions, objective, **extra))
    objective = Objective(settings.sigma_shift, settings.decoder_draws, settings.clean_context_ratio,
                          settings.context_sigma_max)
    rollouts = None
    if settings.rollout_clips:  # the model's own rollouts of world clips, continued step after step
        from scd.own_rollouts import OwnRollouts

        rollouts = OwnRollouts(config, settings.rollout_clips, settings.clip_frames, settings.rollout_horizon,
                               settings.steps, settings.seed + RANK_STRIDE * rank, settings.rollout_past_lost_balls,
                               settings.rollout_scene_psnr)
        if resume and state.get("rollouts") is not None:
            rollouts.load_state_dict(state["rollouts"])
    data = batches(start, rank, ranks)
    began = time.perf_counter()

    def checkpoint(done: int, rng, cuda_rng) -> None:
        rngs = accelerator.gather(rng[None]) if ranks > 1 else None  # every process's noise state (all take part)
        if accelerator.is_main_process:
            _save_checkpoint(ckpt, {"model": raw.state_dict(), "ema": ema.state_dict(),
                                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                    "rng": rng, "step": done, "losses": losses, "config": config.to_dict(),
                                    "rng_ranks": None if rngs is None else [r.clone() for r in rngs.cpu()],
                                    "cuda_rng": cuda_rng, "wall_s": wall_before + time.perf_counter() - began,
                                    "objective": loss_key,
                                    "rollouts": None if rollouts is None else rollouts.state_dict()})
            _save_losses(out / "losses.csv", losses)

    def forward_backward(step: int) -> torch.Tensor:
        batch = next(data)
        video, actions = batch[0], batch[1]
        context = batch[2] if len(batch) > 2 else None  # world clips drawn partly off (shift_share)
        sinks = batch[3] if len(batch) > 3 else None  # a model with attention sinks: each clip's sink frames
        if sinks is None and getattr(config, "sink_frames", 0):
            raise ConfigError("a model with attention sinks trains on batches that bring sink frames: the world's "
                              "(data 'world')", parameter="data")
        slipped = own_weight = None
        if settings.shift_weight:  # the loss near each slip, in the frame after it
            from scd.world import slip_weights

            slipped = slip_weights(video, context, settings.shift_weight)
        if rollouts is not None:  # true clips (their own context) and rollout clips (the model's frames as context)
            own, truth, own_actions, own_weight, own_sinks = rollouts.next_clips(raw, step)
            context, video = torch.cat([video if context is None else context, own]), torch.cat([video, truth])
            sinks = None if sinks is None else torch.cat([sinks, own_sinks])
            actions = None if actions is None else torch.cat([actions, own_actions])
        context = None if context is None else context.to(accelerator.device)
        sinks = None if sinks is None else sinks.to(accelerator.device)
        video = video.to(accelerator.device)
        weight = None
        if settings.object_weight or slipped is not None or own_weight is not None:
            from scd.world import loss_weights

            # the true clips come first (their slips), the rollout clips last (their lost balls out of the loss)
            weight = loss_weights(video, settings.object_weight, slipped, own_weight)
        actions = drop_actions(actions, config, settings.action_dropout)
        actions = None if actions is None or config.condition is None else actions.to(accelerator.device)
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in range(settings.grad_accum):  # the step's batch in passes; gradients add up
            piece = slice(part * len(video) // settings.grad_accum, (part + 1) * len(video) // settings.grad_accum)
            with autocast():
                pass_loss = compute(raw, video[piece], None if actions is None else actions[piece], objective,
                                    **({} if context is None else {"context": context[piece]}),
                                    **({} if weight is None else {"weight": weight[piece]}),
                                    **({} if sinks is None else {"sinks": sinks[piece]}))
            if not torch.isfinite(pass_loss):
                raise DataError(f"the loss became {pass_loss.item()} at step {step}: lower the learning rate or check the data")
            accelerator.backward(pass_loss / settings.grad_accum)
            loss = loss + pass_loss.detach() / settings.grad_accum
        if ranks > 1:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            loss = accelerator.reduce(loss.detach(), reduction="mean")
        return loss

    def update(step: int, loss: torch.Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))  # warm-up: early EMA forgets the initialisation
        with torch.no_grad():
            for e, p in zip(ema.parameters(), raw.parameters()):
                e.lerp_(p.detach().to(e.dtype), 1 - decay)
        losses.append(loss.item())

    def rng_states():
        return torch.get_rng_state(), torch.cuda.get_rng_state(accelerator.device) if torch.cuda.is_available() else None

    safe = None  # (finished steps, RNG states) while the model is exactly that many steps in; None mid-update
    try:
        for step in range(start, settings.steps):
            safe = (step, *rng_states())  # an interrupted step is redone from here on resume
            loss = forward_backward(step)
            with signals_held():  # a Ctrl-C mid-update lands after it, so the step is saved, not lost
                safe = None
                update(step, loss)
                done = step + 1
                safe = (done, *rng_states())
            rate = (done - start) / (time.perf_counter() - began)
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                checkpoint(*safe)
            yield Progress(done, settings.steps, losses[-1], rate, (settings.steps - done) / rate if rate else 0.0,
                           accelerator.is_main_process)
    except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, SIGTERM, or the caller stopped early
        if safe is not None and safe[0] > start and ranks == 1:
            checkpoint(*safe)
        raise
    if accelerator.is_main_process:
        ema.config = config
        save_model_folder(ema, out, card(losses, wall_before + time.perf_counter() - began) if card else None)
        if codec_folder is not None:
            _copy_codec(Path(codec_folder), out / CODEC_DIR)
    if ranks > 1:
        # the processes leave together and close the group: a gloo group alive at interpreter exit
        # can abort its process ("terminate called without an active exception")
        accelerator.wait_for_everyone()
        accelerator.end_training()


def _copy_codec(source: Path, target: Path) -> None:
    """The autoencoder into the model folder, replaced whole (a stale one must not stay)."""
    if source.resolve() == target.resolve():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as err:
        raise CheckpointError(f"cannot copy the codec into {target}: {err.strerror or err}") from None
