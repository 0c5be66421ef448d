"""Model cards (the README.md of a model folder) for the folders scd writes: converted and trained."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

import scd
from scd.models import ModelConfig


def architecture(config: ModelConfig) -> str:
    """One phrase for the model's structure, as every card and report says it."""
    return config.architecture


# ----------------------------------------------------------------------------- scd convert

def _group(key: str | None) -> str:
    """A tensor's module, with a block's index kept: `decoder.transformer_blocks.2`, `x_embedder`."""
    if key is None:
        return "-"
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == "transformer_blocks" and i + 1 < len(parts):
            return ".".join(parts[:i + 2])
    return ".".join(parts[:-1]) or key


def conversion_card(report, out: Path) -> str:
    """The card of a converted folder: source, hash, sizes, codec, notes, totals and every tensor
    (`report` is a `scd.convert.ConversionReport`)."""
    c = report.config
    rows = [("source", f"`{report.source}`" + (f" at commit `{report.revision}`" if report.revision else "")),
            ("kind", report.description), ("source sha256", f"`{report.sha256}`"),
            ("sizes from", report.options or "-"),
            ("architecture", f"{architecture(c)}; width {c.width} ({c.num_heads} heads x {c.head_dim}), "
                             f"patch {c.patch_size}, {c.channels} x {c.latent_size[0]} x {c.latent_size[1]} latents"),
            ("codec", f"{c.codec.type}" + (f" from `{report.codec}` (sha256 `{report.codec_sha256}`)"
                                                  if report.codec else ""))]
    lines = ["---", "library_name: scd", "tags: [scd, video-generation, causal-diffusion]", "---", "",
             f"# {Path(out).name}", "", f"Converted by `scd convert` (scd {scd.__version__}) from a {report.description}.",
             "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if report.notes:
        lines += [f"- {note}" for note in report.notes] + [""]
    lines += ["## Totals", "", "| action | tensors | parameters |", "|---|---:|---:|"]
    lines += [f"| {a} | {n} | {p:,} |" for a, (n, p) in report.totals().items()] + [""]
    groups: dict[tuple[str, str, str], list] = {}
    for e in report.entries:
        groups.setdefault((_group(e.source), _group(e.target), e.action), []).append(e)
    lines += ["## Mapping", "", "| source | target | action | tensors | note |", "|---|---|---|---:|---|"]
    for (src, tgt, action), items in groups.items():
        notes = sorted({e.note for e in items if e.note})
        lines.append(f"| `{src}` | `{tgt}` | {action} | {len(items)} | {'; '.join(notes)} |")
    dropped = [e for e in report.entries if e.target is None]
    if dropped:
        lines += ["", "## Dropped", "", "These tensors of the source have no counterpart here:", ""]
        lines += [f"- `{e.source}` {list(e.shape)}" for e in dropped]
    lines += ["", "<details><summary>Every tensor</summary>", "", "| target | source | action | shape |",
              "|---|---|---|---|"]
    lines += [f"| {e.target or '-'} | {e.source or '-'} | {e.action} | {list(e.shape)} |" for e in report.entries]
    lines += ["", "</details>", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scd train

def training_card(command: str, config: ModelConfig, settings, data: str):
    """A function (losses, wall seconds) -> the card of a trained folder, written at every checkpoint.
    `settings` is a `scd.train.TrainSettings`; `command` the command line that reproduces the run."""
    hardware = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    decay = f", linear decay to 0 over the last {settings.decay}" if settings.decay else ""
    recipe = [f"steps: {settings.steps}", f"batch {settings.batch_size} clips of {settings.clip_frames} frames",
              f"lr {settings.lr} ({settings.warmup} warm-up steps{decay})"]
    if config.arch == "scd":
        recipe.append(f"decoder x{settings.decoder_lr_ratio:g}")
    recipe.append(f"EMA {settings.ema_decay}")
    if settings.clean_context_ratio < 1:  # both models read noised context when asked
        recipe.append(f"clean context {settings.clean_context_ratio:g} (else sigma <= {settings.context_sigma_max:g})")
    recipe.append(f"context window {config.window or config.context_frames} frames")
    sinks = getattr(config, "sink_frames", 0)
    if sinks:
        recipe.append(f"{sinks} attention-sink frame{'s' if sinks > 1 else ''} beside it (seen {config.sink_distance} "
                      "frames before its oldest)" + (", every object of a training sink drawn at a random place"
                                                     if settings.sink_scatter else ""))
    if settings.rollout_clips:
        from scd.own_rollouts import SCENE_PSNR  # deferred: only a rollout run's card needs it

        scene_psnr = SCENE_PSNR if settings.rollout_scene_psnr is None else settings.rollout_scene_psnr
        recipe.append(f"{settings.rollout_clips} clips per step from the model's own rollouts (up to "
                      f"{settings.rollout_horizon} frames) beside the true ones"
                      + (f", run on past a lost ball (its pixels out of the loss) until the scene is below "
                         f"{scene_psnr:g} dB" if settings.rollout_past_lost_balls else ""))
    if settings.occlusion_share:
        recipe.append(f"{settings.occlusion_share:.0%} of each batch's clips ending at an occlusion")
    if settings.pillar_share:
        recipe.append(f"{settings.pillar_share:.0%} ending with an object deep behind the pillar")
    if settings.shift_share:
        where = "the frame before the last" if settings.shift_last else "one context frame"
        recipe.append(f"{settings.shift_share:.0%} of each batch's clips with an object drawn 1 px off in {where}"
                      + (f", the loss x{1 + settings.shift_weight:g} near it in the frame after" if settings.shift_weight else ""))
    if settings.object_weight:
        recipe.append(f"loss weight x{1 + settings.object_weight:g} on the moving objects")
    depth = f"{config.depth} layers" + (f" (decoder input: {config.decoder_input})" if config.decoder_input else "")

    def card(losses: list[float], wall_s: float) -> str:
        tail = losses[-50:]
        return (f"# {config.arch} model trained by scd\n\n"
                f"- data: {data}\n"
                f"- {', '.join(recipe)}\n"
                f"- wall time: {wall_s / 60:.1f} min on {hardware}, torch {torch.__version__}\n"
                f"- final loss (mean of the last {len(tail)} steps): {sum(tail) / max(1, len(tail)):.4f}\n"
                f"- architecture: width {config.width} ({config.num_heads} x {config.head_dim}), {depth}, "
                f"patch {config.patch_size}, {config.tokens_per_frame} tokens per frame\n\n"
                f"Made with:\n\n```\n{command}\n```\n")
    return card
