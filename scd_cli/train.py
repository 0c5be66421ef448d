"""`scd train`: train or fine-tune SCD or the baseline (runs unchanged under `accelerate launch`)."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Optional

import torch
import typer

from scd import data as sources
from scd import dataset, new_models
from scd import train as training
from scd.cards import training_card
from scd.checkpoints import load_model
from scd.devices import use_threads
from scd.errors import ConfigError
from scd.models.far import deepen
from scd.own_rollouts import SCENE_PSNR
from scd.world import ACTIONS as WORLD_ACTIONS
from scd_cli.common import (
    Threads,
    console,
    err_console,
    handles_errors,
    is_interactive,
    say,
    state,
)
from scd_cli.encode import draw, summarize

ENCODED = "encoded-data"  # a plain video folder is encoded into OUT/encoded-data-<settings key>


def _command_line(ctx: typer.Context) -> str:
    """The options given on the command line, for the model card's reproduction recipe."""
    parts = ["scd", "train"]
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":
            continue
        flag = "--" + name.replace("_", "-")
        parts += [flag] if value is True else [flag, shlex.quote(str(value))]
    return " ".join(parts)


@handles_errors
def train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Model folder to write (checkpoints go there too)."),
    arch: str = typer.Option("scd", "--arch", help="scd or baseline."),
    family: str = typer.Option("far", "--family", help="A new model's family: far (the FAR-style transformers) or wan (Wan2.1's blocks, frame-wise, actions through the time embedding; docs/training.md, 'SCD from Wan on the world')."),
    data: str = typer.Option("world", "--data", help="'world' (the synthetic world stream), a latent dataset (scd encode), or a folder of videos (with optional NAME.actions.txt; encoded into OUT/encoded-data-KEY first)."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes reading a dataset (0: in the training process)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Run each step's batch in N passes of --batch-size / N clips (same batch, less memory)."),
    mixed_precision: str = typer.Option("auto", "--mixed-precision", help="bf16 autocast, or no; auto: bf16 on CUDA, no on CPU."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this model folder (e.g. a converted baseline; with --distill-from the default is the teacher)."),
    distill_from: Optional[str] = typer.Option(None, "--distill-from", help="Few-step distillation: the SCD teacher whose --teacher-steps samples the decoder learns to match in --distill-steps (docs/training.md, 'Few-step distillation')."),
    distill_steps: Optional[int] = typer.Option(None, "--distill-steps", help="Distillation: the student's decoder steps (the written model's default)."),
    teacher_steps: Optional[int] = typer.Option(None, "--teacher-steps", help="Distillation: the teacher's steps (default: its own default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in OUT (refused without this or --resume)."),
    threads: Threads = None,
    steps: int = typer.Option(1000, "--steps"),
    batch_size: int = typer.Option(8, "--batch-size"),
    clip_frames: int = typer.Option(8, "--clip-frames"),
    lr: float = typer.Option(3e-4, "--lr"),
    warmup: int = typer.Option(100, "--warmup"),
    decay: int = typer.Option(0, "--decay", help="Lower the learning rate linearly to 0 over the last N steps (0: constant)."),
    ema_decay: float = typer.Option(0.998, "--ema-decay"),
    decoder_draws: int = typer.Option(2, "--decoder-draws", help="SCD: noise draws (decoder targets) per encoder pass (the reference's decoder_multi_batch)."),
    decoder_lr_ratio: float = typer.Option(2.0, "--decoder-lr-ratio", help="SCD decoder learning rate / encoder's (the reference: 2)."),
    sigma_shift: float = typer.Option(1.0, "--sigma-shift", help="Shift noise levels toward 1 (SD3-style; 1 = the reference's logit-normal)."),
    clean_context_ratio: float = typer.Option(1.0, "--clean-context-ratio", help="Share of context frames the model sees clean (SCD: its encoder); the others are noised (the SCD reference: 0.1)."),
    context_sigma_max: float = typer.Option(1.0, "--context-sigma-max", help="Noised context frames draw sigma from this times logit-normal."),
    context_frames: Optional[int] = typer.Option(None, "--context-frames", help="Context window the new model folder defaults to (default: --clip-frames - 1, the most any training frame saw; with --init: the initial model's)."),
    rollout_clips: int = typer.Option(0, "--rollout-clips", help="World: clips per step from the model's own rollouts (its generated frames as context, the simulator's as targets), beside --batch-size true clips."),
    rollout_horizon: int = typer.Option(128, "--rollout-horizon", help="World: the longest of those rollouts, in frames."),
    rollout_scene_psnr: Optional[float] = typer.Option(None, "--rollout-scene-psnr", help=f"World, with --rollout-past-lost-balls: a rollout restarts when its scene (the pixels no object covers) falls below this PSNR, dB (default {SCENE_PSNR:g})."),
    rollout_past_lost_balls: bool = typer.Option(False, "--rollout-past-lost-balls", help="World: a rollout runs on past a ball it lost, restarting only when it loses the agent or the scene; the lost ball's pixels are left out of its loss (with --rollout-clips)."),
    object_weight: float = typer.Option(0.0, "--object-weight", help="World: extra loss weight on the moving objects' pixels (0: none)."),
    occlusion_share: float = typer.Option(0.0, "--occlusion-share", help="World: share of each batch's clips cut to end where a ball meets the other ball or the agent (0: none)."),
    pillar_share: float = typer.Option(0.0, "--pillar-share", help="World: share of each batch's clips cut to end with a ball or the agent deep behind the pillar (one column showing) or just out from there, where rollouts lose them most (0: none; with --occlusion-share at most 1 in all)."),
    shift_share: float = typer.Option(0.0, "--shift-share", help="World: share of each batch's clips whose context draws an object one pixel off in one frame, the targets staying true: training to recover from the misplacements that start a drift (0: none)."),
    sink_frames: Optional[int] = typer.Option(None, "--sink-frames", help="Attention sinks (world, FAR family): the model keeps a stream's first N frames beside its rolling window, seen a fixed distance before it however long the stream runs, and trains with N frames of each clip's world there (its scene, its objects elsewhere). With --init: added to the initial model (default: its own)."),
    sink_scatter: bool = typer.Option(False, "--sink-scatter", help="World, a model with attention sinks: its training sink frames draw every object at a random place, so it learns to read only the scene from them (a stream's first frames are as unrelated to its present by frame 1,000)."),
    shift_last: bool = typer.Option(False, "--shift-last", help="World, with --shift-share: every slip in the frame before the clip's last, so the last frame is always made from a context whose newest frame is off (a window of 4 or more frames can tell that from a change of velocity)."),
    shift_weight: float = typer.Option(0.0, "--shift-weight", help="World, with --shift-share: extra loss weight on the pixels of the frame after a slip that lie within 2 px of it, where extrapolating the slip goes wrong (0: none)."),
    grow_encoder: Optional[int] = typer.Option(None, "--grow-encoder", min=1, help="With --init (FAR family): N more blocks after the initial model's in the part that reasons over time (SCD's encoder, which runs once per frame; the baseline's stack), each starting as the identity, so training begins from what the initial model generates. Give it again with --resume."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every"),
    seed: int = typer.Option(0, "--seed"),
    heads: int = typer.Option(4, "--heads"),
    head_dim: int = typer.Option(16, "--head-dim"),
    layers: int = typer.Option(6, "--layers", help="Total depth (SCD: encoder + decoder)."),
    decoder_layers: int = typer.Option(2, "--decoder-layers"),
    decoder_combine: str = typer.Option("token_concat", "--decoder-combine", help="How SCD's decoder takes the encoder's features: token_concat (the paper's), add, concat, token_concat_with_proj."),
    patch_size: int = typer.Option(4, "--patch-size"),
    default_steps: int = typer.Option(8, "--default-steps", help="Decoder steps the model folder defaults to."),
    frame_size: int = typer.Option(32, "--frame-size", help="Square frame size of a new model (the world is 32)."),
    skip_bad_shards: bool = typer.Option(False, "--skip-bad-shards", help="Leave out dataset shards that are missing, cut short or damaged (every checksum is checked first), with a warning naming each; without it a bad shard stops the run before its first step."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors and warnings."),
):
    """Train SCD or its causal baseline; writes an EMA model folder with a model card."""
    state["quiet"] = quiet
    settings = training.TrainSettings(steps=steps, batch_size=batch_size, clip_frames=clip_frames, lr=lr, warmup=warmup, decay=decay,
                                      ema_decay=ema_decay, decoder_lr_ratio=decoder_lr_ratio, sigma_shift=sigma_shift,
                                      clean_context_ratio=clean_context_ratio, context_sigma_max=context_sigma_max, seed=seed, checkpoint_every=checkpoint_every,
                                      grad_accum=grad_accum, mixed_precision=mixed_precision, decoder_draws=decoder_draws,
                                      rollout_clips=rollout_clips, rollout_horizon=rollout_horizon, object_weight=object_weight,
                                      occlusion_share=occlusion_share, pillar_share=pillar_share, shift_share=shift_share, shift_last=shift_last, shift_weight=shift_weight,
                                      rollout_past_lost_balls=rollout_past_lost_balls,
                                      rollout_scene_psnr=rollout_scene_psnr, sink_scatter=sink_scatter)
    if data != "world" and (rollout_clips or object_weight or occlusion_share or pillar_share or shift_share or sink_frames):
        raise ConfigError("--rollout-clips, --object-weight, --occlusion-share, --pillar-share, --shift-share and --sink-frames need the "
                          "synthetic world's simulator: use --data world", "data")
    if (rollout_clips or object_weight or shift_share) and (distill_from is not None or family == "wan"):
        raise ConfigError("--rollout-clips, --object-weight and --shift-share shape the flow loss of a FAR-style "
                          "model: not with --distill-from or a Wan model", "rollout_clips")
    loaded = load_model(init) if init else None
    if loaded is not None and (rollout_clips or object_weight or shift_share) and loaded.config.family != "far":
        raise ConfigError("--rollout-clips, --object-weight and --shift-share shape the flow loss of a FAR-style "
                          f"model, not of {loaded.source}'s {loaded.config.architecture}", "rollout_clips")
    distiller = None
    if distill_from is not None or distill_steps is not None or teacher_steps is not None:
        from scd.distill import distillation

        teacher = load_model(distill_from) if distill_from else None
        loaded = loaded or (load_model(distill_from) if distill_from else None)
        distiller = distillation(teacher, loaded, distill_steps, teacher_steps, settings)
    stored = None
    if data != "world":
        training.check_out(out, resume, overwrite)  # before a plain folder is encoded into it
        stored = Path(data)
        if not dataset.is_dataset(stored):  # a plain folder of videos: encoded once, then read like any dataset
            encoding = (dataset.model_encoding(loaded) if loaded is not None
                        else dataset.pixel_encoding((frame_size, frame_size), WORLD_ACTIONS))
            from accelerate import PartialState

            encoded = out / f"{ENCODED}-{encoding.key()}"
            with PartialState(cpu=not torch.cuda.is_available()).main_process_first():  # under accelerate launch the others find it done
                events = dataset.encode_folder(stored, encoded, encoding)
                summarize(draw(events, f"encode {stored.name}")) if os.environ.get("RANK", "0") == "0" and not quiet \
                    else list(events)
            stored = encoded
        stored = dataset.LatentDataset(stored, skip_bad_shards=skip_bad_shards)
        for file, problem in stored.skipped_shards:
            err_console.print(f"[yellow]warning:[/] skipped the dataset shard {file}: {problem}", soft_wrap=True)
    if grow_encoder is not None:
        if loaded is None or loaded.config.family != "far":
            raise ConfigError("--grow-encoder deepens the FAR-style model of --init (a new model takes --layers)",
                              parameter="grow_encoder")
        loaded = dataclasses.replace(loaded, model=deepen(loaded.model, grow_encoder))
        loaded.config = loaded.model.config
    if loaded is not None:
        config = loaded.config
        if context_frames is not None:  # fine-tuning on longer clips: the folder generates with the longer window
            config = dataclasses.replace(config, context_frames=context_frames, window=context_frames)
        if sink_frames is not None:
            if config.family != "far":
                raise ConfigError("--sink-frames adds attention sinks to a FAR-style model; a Wan model has its own "
                                  "(sink_size)", parameter="sink_frames")
            config = dataclasses.replace(config, sink_frames=sink_frames)
    else:
        make = new_models.new_wan_config if family == "wan" else new_models.new_config
        if family not in ("far", "wan"):
            raise ConfigError(f"family must be far or wan, not {family!r}", parameter="family")
        config = make(arch, heads, head_dim, layers, decoder_layers, decoder_combine, patch_size, frame_size,
                      default_steps, context_frames or clip_frames - 1, world_demo=data == "world",
                      data_fields=None if stored is None else sources.model_fields(stored))
        if sink_frames:
            if family != "far":
                raise ConfigError("--sink-frames adds attention sinks to a FAR-style model", parameter="sink_frames")
            config = dataclasses.replace(config, sink_frames=sink_frames)
        note = new_models.wan_rotary_note(config) if family == "wan" else None
        if note:
            split = f" (--heads {note.heads} --head-dim {note.head_dim})" if note.heads else ""
            err_console.print(f"[yellow]warning:[/] {note.message}{split}", soft_wrap=True)
    command = _command_line(ctx)
    if stored is None:
        source = sources.world_source(settings, config)
    else:
        source = sources.dataset_source(stored, settings, config, workers, loaded)
    use_threads(threads)
    card = training_card(command, config, settings, source.description)
    events = training.train(config, out, settings, source.batches, loaded, resume,
                            distiller.card(card) if distiller else card, overwrite=overwrite,
                            codec_folder=source.codec_folder, loss=distiller)
    try:
        _consume(events, settings.steps)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the library saved the last finished step
        events.close()
        if (out / "checkpoint.pt").is_file():
            err_console.print(f"the training so far is saved in {out / 'checkpoint.pt'}: continue it with the same "
                              "command and --resume", soft_wrap=True)
        raise
    if os.environ.get("RANK", "0") == "0":
        say(f"wrote {out}")


def _consume(events, steps: int) -> None:
    if os.environ.get("RANK", "0") != "0":  # another process of `accelerate launch`: the main one draws
        for _ in events:
            pass
    elif is_interactive() and not state["quiet"]:
        _draw_live(events, steps)
    else:
        for p in events:
            if p.step % 10 == 0 or p.step == p.steps:
                say(f"step {p.step}/{p.steps} loss {p.loss:.4f} {p.steps_per_s:.2f} steps/s ETA {p.eta_s / 60:.1f} min")


def _draw_live(events, steps: int) -> None:
    """A live bar with the step, the loss (mean of the last 10 steps), steps/s and the ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]} steps/s"), TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn())
    recent: list[float] = []
    with Progress(*columns, console=console, transient=False) as bar:
        task = None
        for p in events:
            if task is None:
                task = bar.add_task("train", total=steps, completed=p.step - 1, loss="-", rate="-", eta="-")
            recent = (recent + [p.loss])[-10:]
            minutes, seconds = divmod(int(p.eta_s), 60)
            bar.update(task, completed=p.step, loss=f"{sum(recent) / len(recent):.4f}", rate=f"{p.steps_per_s:.2f}",
                       eta=f"{minutes}:{seconds:02d}")
