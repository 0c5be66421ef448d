"""Training lowers the loss, resumes bit-identically, writes a loadable model folder."""

import dataclasses

import pytest
import torch
from conftest import random_model, tiny_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from scd import data, world
from scd import train as training
from scd.checkpoints import load_model_folder, save_model_folder
from scd_cli.app import app

WORLD = dict(latent_size=(32, 32), frame_size=(32, 32), patch_size=8, demo="world")


def fixed_batches(n=4, frames=4):
    """One batch of world clips, repeated: a loss that can and must go down."""
    batch = next(world.stream_batches(0, n, frames))
    return lambda start, rank=0, ranks=1: iter([batch] * 1000)


def test_loss_goes_down_for_both_archs(tmp_path):
    for arch in ("scd", "baseline"):
        config = tiny_config(arch=arch, **WORLD)
        settings = training.TrainSettings(steps=40, lr=3e-3, warmup=1, checkpoint_every=100, action_dropout=0.0)
        losses = [p.loss for p in training.train(config, tmp_path / arch, settings, fixed_batches())]
        assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, (arch, losses[:5], losses[-5:])
        assert load_model_folder(tmp_path / arch).config.arch == arch




@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_learns_with_noised_context(tmp_path, arch):
    config = tiny_config(arch=arch, **WORLD)
    settings = training.TrainSettings(steps=40, lr=3e-3, warmup=1, checkpoint_every=100, action_dropout=0.0,
                                      clean_context_ratio=0.5, context_sigma_max=0.3)
    losses = [p.loss for p in training.train(config, tmp_path / "m", settings, fixed_batches())]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])


def test_learning_rate_warms_up_holds_and_decays_to_zero():
    settings = training.TrainSettings(steps=100, warmup=10, decay=20)
    factors = [training.lr_factor(s, settings) for s in range(100)]
    assert factors[0] == 0.1 and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and abs(factors[90] - 0.5) < 1e-9 and abs(factors[99] - 0.05) < 1e-9
    assert training.lr_factor(99, training.TrainSettings(steps=100, warmup=10)) == 1.0


def test_resume_is_bit_identical(tmp_path):
    config = tiny_config(**WORLD)
    make = lambda steps: training.TrainSettings(steps=steps, batch_size=2, clip_frames=3, checkpoint_every=3, warmup=2)
    batches = data.world_batches(make(6), config)
    straight = [p.loss for p in training.train(config, tmp_path / "a", make(6), batches)]
    first = [p.loss for p in training.train(config, tmp_path / "b", make(3), batches)]
    rest = [p.loss for p in training.train(config, tmp_path / "b", make(6), batches, resume=True)]
    assert first + rest == straight
    import dataclasses

    from scd.errors import ConfigError

    with pytest.raises(ConfigError, match="decoder_combine"):  # same tensors, another model: refused
        list(training.train(dataclasses.replace(config, decoder_combine="add"), tmp_path / "b", make(8), batches, resume=True))
    rows = (tmp_path / "b" / "losses.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [float(r.split(",")[1]) for r in rows[1:]] == [round(v, 6) for v in straight]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint written before a config field existed (guidance_mode came later) resumes with its default
    ckpt = tmp_path / "b" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["guidance_mode"]
    torch.save(state, ckpt)
    assert len([p.loss for p in training.train(config, tmp_path / "b", make(7), batches, resume=True)]) == 1


def test_resume_a_checkpoint_from_before_qkv_fusion(tmp_path):
    """Checkpoints of earlier versions hold AdamW's moments for separate to_q, to_k, to_v layers:
    resumed, they continue exactly as the fused run does; a state for another model is refused."""
    from scd.errors import CheckpointError
    from scd.models import build_model

    config = tiny_config(**WORLD)
    make = lambda steps: training.TrainSettings(steps=steps, batch_size=2, clip_frames=3, checkpoint_every=2, warmup=1)
    batches = data.world_batches(make(4), config)
    straight = [p.loss for p in training.train(config, tmp_path / "a", make(4), batches)]
    list(training.train(config, tmp_path / "b", make(2), batches))
    ckpt = tmp_path / "b" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    optim = state["optimizer"]
    chunk = lambda moments, i: {k: v.chunk(3)[i].clone() if v.dim() else v for k, v in moments.items()}
    old_state, old_groups = {}, []  # the earlier layout: q.weight, q.bias, k.weight, k.bias, v.weight, v.bias
    for group, part in zip(optim["param_groups"], build_model(config).parts().values()):
        moments = dict(zip([n for n, _ in part.named_parameters()], [optim["state"][i] for i in group["params"]]))
        pieces = []
        for name, m in moments.items():
            if name.endswith("to_qkv.weight"):
                bias = moments[name.replace(".weight", ".bias")]
                pieces += [p for i in range(3) for p in (chunk(m, i), chunk(bias, i))]
            elif not name.endswith("to_qkv.bias"):
                pieces.append(m)
        ids = list(range(len(old_state), len(old_state) + len(pieces)))
        old_state.update(zip(ids, pieces))
        old_groups.append({**group, "params": ids})
    state["optimizer"] = {"state": old_state, "param_groups": old_groups}
    torch.save(state, ckpt)
    assert [p.loss for p in training.train(config, tmp_path / "b", make(4), batches, resume=True)] == straight[2:]
    del old_groups[0]["params"][-1]  # a state that fits neither layout
    (tmp_path / "b" / "checkpoint.pt").unlink()
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="another model"):
        list(training.train(config, tmp_path / "b", make(6), batches, resume=True))


def test_cli_train_and_bad_options(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    r = runner.invoke(app, ["train", "--out", str(out), "--steps", "2", "--batch-size", "1", "--clip-frames", "3",
                            "--heads", "2", "--head-dim", "16", "--layers", "2", "--decoder-layers", "1", "--patch-size", "8"])
    assert r.exit_code == 0, r.output
    assert "scd train --out" in (out / "README.md").read_text()
    assert load_model_folder(out).config.decoder_layers == 1
    assert load_model_folder(out).config.window == 2  # 3-frame clips: no frame attended to more than 2 before it
    r = runner.invoke(app, ["train", "--out", str(out), "--steps", "0"])
    assert r.exit_code == 2 and "--steps" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--steps", "2", "--decay", "5"])
    assert r.exit_code == 2 and "--decay" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--clean-context-ratio", "1.5"])
    assert r.exit_code == 2 and "--clean-context-ratio" in r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--resume"])
    assert r.exit_code == 2 and "nothing to resume" in r.output


def test_train_on_a_folder_of_real_videos(tmp_path):
    import numpy as np

    from scd.mp4 import write_video

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        frames = np.zeros((6, 20, 24, 3), np.uint8)
        for j in range(6):
            frames[j, 5:12, 2 * j:2 * j + 6] = (200, 50 * i, 90)
        write_video(data / f"clip{i}.mp4", frames, fps=8)
    (data / "clip0.actions.txt").write_text("right\n" * 6)
    out = tmp_path / "m"
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
                                 "--clip-frames", "4", "--heads", "2", "--head-dim", "16", "--layers", "2",
                                 "--decoder-layers", "1", "--patch-size", "8", "--frame-size", "16"])
    assert r.exit_code == 0, r.output
    assert load_model_folder(out).config.frame_size == (16, 16)
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--clip-frames", "50", "--steps", "1",
                                 "--overwrite"])
    assert r.exit_code == 2 and "at least 50 frames" in r.output
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(out), "--overwrite"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_init_from_a_model_folder_and_impossible_sizes(tmp_path):
    runner = CliRunner()
    tiny = ["--steps", "1", "--batch-size", "1", "--clip-frames", "3", "--heads", "2", "--head-dim", "16",
            "--layers", "2", "--decoder-layers", "1", "--patch-size", "8"]
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "a"), *tiny])
    assert r.exit_code == 0, r.output
    start = load_model_folder(tmp_path / "a")
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--steps", "2",
                            "--batch-size", "1", "--clip-frames", "3", "--lr", "1e-2", "--warmup", "1"])
    assert r.exit_code == 0, r.output
    tuned = load_model_folder(tmp_path / "b")
    assert tuned.config == start.config  # the folder's architecture, not the size flags' defaults
    a, b = start.model.state_dict(), tuned.model.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # fine-tuned on longer clips with --context-frames: the folder generates with that window, all else as it was
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "e"), "--steps", "1",
                            "--batch-size", "1", "--clip-frames", "5", "--context-frames", "4"])
    assert r.exit_code == 0, r.output
    longer = load_model_folder(tmp_path / "e").config
    assert (longer.context_frames, longer.window) == (4, 4) and start.config.window == 2
    assert dataclasses.replace(longer, context_frames=2, window=2) == start.config
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "c"), *tiny[:-2], "--patch-size", "5"])
    assert r.exit_code == 2 and "error" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["train", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 2, r.output


def first_step_gradient(out) -> list[torch.Tensor]:
    """The gradient of a run's first (and only) step, from its checkpoint: AdamW's first moment
    after one step is (1 - beta1) * gradient (the clipping threshold is set out of reach)."""
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    beta1 = state["optimizer"]["param_groups"][0]["betas"][0]
    moments = state["optimizer"]["state"]
    return [moments[i]["exp_avg"] / (1 - beta1) for i in sorted(moments)]


def reference_gradient(init, settings, batch, passes: int) -> tuple[list[torch.Tensor], float]:
    """The first step's gradient and loss computed straight from the model's loss, with the random
    draws train makes (seed, action dropout, then each pass's loss in turn): the mean over `passes`
    equal slices of the batch, i.e. the whole batch's mean loss under those draws."""
    model = load_model_folder(init).model.train()
    config = model.config
    torch.manual_seed(settings.seed)
    objective = training.Objective(settings.sigma_shift, settings.decoder_draws, settings.clean_context_ratio,
                                   settings.context_sigma_max)
    video, actions = batch
    actions = training.drop_actions(actions, config, settings.action_dropout)
    total = 0.0
    for piece in torch.arange(len(video)).chunk(passes):
        loss = model.loss(video[piece], actions[piece], objective)
        (loss / passes).backward()
        total += loss.item() / passes
    return [p.grad for part in model.parts().values() for p in part.parameters()], total


def test_gradient_accumulation_mixed_precision_and_decoder_draws(tmp_path):
    """A step's batch in two passes is the step on the whole batch; bf16 autocast trains close to
    float32; the decoder draws are what the decoder trains on; bad values are refused naming their flag."""
    config = tiny_config(**WORLD)
    # every parameter random: the zero-initialised adaLN gates and head of a fresh model would leave
    # most of it without a gradient, and its first loss the same in any precision
    init = save_model_folder(random_model(config), tmp_path / "init")
    batch = next(world.stream_batches(0, 4, 4))
    one = lambda start, rank=0, ranks=1: iter([batch] * 10)
    plain = training.TrainSettings(steps=1, batch_size=4, warmup=1, action_dropout=0.0, ema_decay=0.0, grad_clip=1e9)
    grads, losses = {}, {}
    for name, settings in (("accum", dataclasses_replace(plain, grad_accum=2)), ("draws1", dataclasses_replace(plain, decoder_draws=1)),
                           ("bf16", dataclasses_replace(plain, mixed_precision="bf16")), ("f32", dataclasses_replace(plain, mixed_precision="no"))):
        losses[name] = [p.loss for p in training.train(config, tmp_path / name, settings, one, init=load_model_folder(init))]
        grads[name] = first_step_gradient(tmp_path / name)
        assert len(losses[name]) == 1
    for name, passes, draws in (("accum", 2, 2), ("draws1", 1, 1), ("f32", 1, 2)):
        want, loss = reference_gradient(init, dataclasses_replace(plain, decoder_draws=draws), batch, passes)
        assert len(want) == len(grads[name]) and abs(losses[name][0] - loss) < 1e-6, (name, losses[name], loss)
        scale = max(g.abs().max().item() for g in want)
        assert max((a - b).abs().max().item() for a, b in zip(grads[name], want)) < 1e-5 * scale, name
    # decoder draws change what is trained: the same seed and batch, another gradient
    assert max((a - b).abs().max().item() for a, b in zip(grads["draws1"], grads["f32"])) > 1e-3 * scale
    # bf16 autocast is on (not float32's bits) and close to float32 (bf16 keeps 8 bits of mantissa)
    assert losses["bf16"][0] != losses["f32"][0] and abs(losses["bf16"][0] - losses["f32"][0]) < 0.02 * losses["f32"][0]
    runner = CliRunner()
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--batch-size", "4", "--grad-accum", "3"])
    assert r.exit_code == 2 and "--grad-accum must divide the batch size (4)" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--mixed-precision", "fp16"])
    assert r.exit_code == 2 and "--mixed-precision must be one of auto, no, bf16" in r.output, r.output
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--decoder-draws", "0"])
    assert r.exit_code == 2 and "--decoder-draws must be >= 1" in r.output, r.output


def dataclasses_replace(settings, **changes):
    import dataclasses

    return dataclasses.replace(settings, **changes)


def test_the_card_records_noised_context_for_either_model():
    from scd.cards import training_card

    for arch in ("scd", "baseline"):
        config = tiny_config(arch=arch, **WORLD)
        noised = training.TrainSettings(steps=10, clean_context_ratio=0.5, context_sigma_max=0.3)
        card = training_card("scd train", config, noised, "synthetic world")([0.5] * 10, 60.0)
        assert "clean context 0.5 (else sigma <= 0.3)" in card, arch
        clean = training_card("scd train", config, training.TrainSettings(steps=10), "synthetic world")([0.5] * 10, 60.0)
        assert "clean context" not in clean, arch


def test_the_card_records_attention_sinks_and_their_scattered_objects():
    from scd.cards import training_card

    config = tiny_config(**WORLD, window=3, sink_frames=1)
    plain = training_card("scd train", config, training.TrainSettings(steps=10), "synthetic world")([0.5] * 10, 60.0)
    assert "1 attention-sink frame beside it (seen 32 frames before its oldest)" in plain
    assert "random place" not in plain
    scattered = training_card("scd train", config, training.TrainSettings(steps=10, sink_scatter=True),
                              "synthetic world")([0.5] * 10, 60.0)
    assert "every object of a training sink drawn at a random place" in scattered
    unsunk = training_card("scd train", tiny_config(**WORLD), training.TrainSettings(steps=10), "synthetic world")([0.5] * 10, 60.0)
    assert "attention-sink" not in unsunk
