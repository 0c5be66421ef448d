"""Compiled streams (scd.compiler): the same frames as eager, static shapes that never recompile
after warm-up, eager fallback, and the CUDA choices that can be checked without a GPU.

The recompile tests use torch.compile's "eager" backend: recompiling is decided by dynamo's guards
before any backend runs, so the count is the same as inductor's at a fraction of the cost.
"""

import pytest
import torch
from conftest import random_model, stream_inputs, tiny_config

from scd import compiler as compiler_lib
from scd.compiler import Guarded, compile_counts, compile_mode, compiler
from scd.errors import ConfigError
from scd.sampling import Rollout, generate, stream

B, F, U, K = 2, 2, 12, 2


def inputs(config, seed=1):
    return stream_inputs(config, B, F, U, seed)


@pytest.mark.parametrize("arch, guidance", [("scd", 1.0), ("baseline", 2.0)])
def test_compiled_stream_matches_eager_and_never_recompiles(arch, guidance):
    """Past the ring's wrap (window 3, 12 frames): after the first two frames no graph is compiled,
    nor for a second stream of the same shapes."""
    model = random_model(tiny_config(arch=arch, layers=2, decoder_combine="token_concat_with_proj"))
    context, actions, noise = inputs(model.config)
    eager = generate(model, context, U, K, guidance=guidance, conditions=actions, noise=noise, window=3)
    frames, graphs = [], []
    before = compile_counts()["unique_graphs"]  # process-wide: earlier tests' graphs are in it
    for frame in stream(model, context, U, K, guidance=guidance, conditions=actions, noise=noise, window=3,
                        compiled="eager"):
        frames.append(frame.latents)
        graphs.append(compile_counts()["unique_graphs"] - before)
    assert (torch.stack(frames, 1) - eager).abs().max() < 1e-5
    # this stream traced one graph per compiled call (the context pass and the denoising steps), in
    # its first frame, and never again
    assert sorted(name for name, _ in model._compiled) == ["append_frame", "denoise_steps"]
    assert all(call.fallback is None for call in model._compiled.values())
    assert graphs == [len(model._compiled)] * U, graphs
    rollout = Rollout(model, context, K, guidance, actions=actions[:, :F], window=3, compiled="eager", seed=3)
    for u in range(4):
        rollout.step(actions[:, F + u])
    assert compile_counts()["unique_graphs"] - before == graphs[-1]  # a second stream reuses them
    assert rollout.compile_fallbacks == {}


def test_each_model_runs_only_what_was_traced_for_it():
    """Compiled calls skip the guards on a model's own attributes (`stream_guards`), so each model
    keeps its own: two models of one width and different depths, streamed in turn, and a model
    moved to another dtype, each give their eager frames."""
    shallow = random_model(tiny_config(layers=2, decoder_layers=1))
    deep = random_model(tiny_config(layers=4, decoder_layers=2), seed=1)
    context, actions, noise = inputs(shallow.config)
    run = lambda model, compiled: generate(model, context.to(next(model.parameters()).dtype), 3, K,
                                           conditions=actions[:, :F + 3], noise=noise[:, :3], window=3, compiled=compiled)
    for model in (shallow, deep, shallow):
        assert (run(model, "eager") - run(model, False)).abs().max() < 1e-5
    graphs = compile_counts()["unique_graphs"]
    deep.to(torch.float64)  # the parameters' dtypes are still guarded: traced again, not run stale
    assert (run(deep, "eager") - run(deep, False)).abs().max() < 1e-5
    assert compile_counts()["unique_graphs"] > graphs
    assert {key[0] for key in deep._compiled} == {"append_frame", "denoise_steps"}


def test_a_call_that_fails_to_compile_runs_eagerly():
    def refuse(graph, example_inputs):
        raise RuntimeError("no compiler here")

    calls = []

    def velocity(x):
        calls.append(1)
        return x * 2

    guarded = Guarded(velocity, torch.compile(velocity, backend=refuse))
    x = torch.ones(3)
    assert torch.equal(guarded(x), x * 2) and torch.equal(guarded(x), x * 2)
    assert "no compiler here" in guarded.fallback
    # an error of the call itself is not hidden: eager raises it again
    bad = Guarded(lambda t: t @ t, torch.compile(lambda t: t @ t, backend="eager"))
    with pytest.raises(RuntimeError, match=r"size mismatch|cannot be multiplied"):
        bad(torch.ones(2, 3))


def test_cuda_gets_cuda_graphs_and_other_devices_the_default_mode():
    # the CUDA branch's choice, checked without a GPU: inductor's reduce-overhead mode (CUDA graphs)
    assert compile_mode(torch.device("cuda"), "inductor") == "reduce-overhead"
    assert compile_mode(torch.device("cuda:1"), "aot_eager") is None
    assert compile_mode(torch.device("cpu"), "inductor") is None
    assert compiler("cpu", "inductor").options == {"cpp_wrapper": True}  # the C++ kernel wrapper: the CPU only
    assert compiler("cuda", "inductor").options == {} and compiler("cpu", "eager").options == {}
    assert compiler("cuda", "inductor").mode == "reduce-overhead"
    assert compiler("cpu", "eager") is compiler("cpu", "eager")  # one per (device, backend): reused compiled code
    with pytest.raises(ConfigError, match="compile backend must be one of"):
        compiler("cpu", "tvm")
    assert set(compiler_lib.BACKENDS) == {"inductor", "aot_eager", "eager"}


def test_rollout_rejects_an_unknown_backend():
    model = random_model(tiny_config())
    context, _, _ = inputs(model.config)
    with pytest.raises(ConfigError, match="compile backend"):
        Rollout(model, context, K, frames=1, compiled="tvm")
