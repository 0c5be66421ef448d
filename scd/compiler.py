"""How a stream is compiled: torch.compile of the models' per-frame and per-step calls.

A compiled stream has static shapes (`scd.models.StreamState`: every attention reads the whole
preallocated cache through a mask), so after its first frames nothing recompiles however long it
runs. On CUDA, inductor's "reduce-overhead" mode replays each call as a CUDA graph; elsewhere the
default mode. A call that fails to compile runs eagerly instead (`fallbacks` says why).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

BACKENDS = ("inductor", "aot_eager", "eager")


def compile_mode(device: torch.device, backend: str) -> str | None:
    """The torch.compile mode for `device`: CUDA graphs ("reduce-overhead") on CUDA with inductor."""
    return "reduce-overhead" if torch.device(device).type == "cuda" and backend == "inductor" else None


def compile_options(device: torch.device, backend: str) -> dict:
    """Inductor options beside the mode: on the CPU, the C++ wrapper that calls the kernels (the
    Python one cost a fifth of a small model's compiled frame: 5.0-5.5 against 6.0-7.2 ms)."""
    return {"cpp_wrapper": True} if torch.device(device).type == "cpu" and backend == "inductor" else {}


@functools.lru_cache(maxsize=None)
def compiler(device_type: str, backend: str = "inductor") -> Callable[[Callable], Callable]:
    """A function that compiles a model call for a stream on `device_type` with `backend`; the same
    object for the same arguments, so models reuse what they compiled for an earlier stream."""
    if backend not in BACKENDS:
        from scd.errors import ConfigError

        raise ConfigError(f"compile backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    mode = compile_mode(torch.device(device_type), backend)
    options = compile_options(torch.device(device_type), backend)

    def compile_call(fn: Callable) -> Callable:
        return Guarded(fn, torch.compile(fn, backend=backend, mode=mode, dynamic=False, isolate_recompiles=True,
                                         options={"guard_filter_fn": stream_guards, **options}))

    compile_call.backend, compile_call.mode, compile_call.options = backend, mode, options
    return compile_call


def stream_guards(entries) -> list[bool]:
    """Which of dynamo's guards a compiled stream call keeps: all of them but those on the model's
    own attributes (its modules and their flags), whose checking cost more than a tenth of a small
    model's frame; every tensor's dtype, device and shape (parameters too) is still checked. Safe
    because each compiled call belongs to one model (`compiled_call`, `StreamState.run`) and keeps
    its own compiled entries (isolate_recompiles): the structure it was traced with cannot change."""
    return [entry.guard_type == "TENSOR_MATCH" or not entry.orig_guard.source.is_unspecialized_nn_module()
            for entry in entries]


class Guarded:
    """A compiled call that falls back to `eager` for good if compiling or running it compiled
    raises; the error is kept in `fallback`. An error of the call itself is raised again by eager."""

    def __init__(self, eager: Callable, compiled: Callable):
        self.eager, self.compiled = eager, compiled
        self.fallback: str | None = None

    def __call__(self, *args):
        if self.fallback is None:
            try:
                return self.compiled(*args)
            except Exception as err:  # any compiler failure: the eager call below says if it was ours
                self.fallback = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        return self.eager(*args)


def compiled_call(fn: Callable, compile_call: Callable, owner) -> "Guarded":
    """`compile_call(fn)` made once per (function, compiler) for `owner` (a model) and kept on it:
    its later streams reuse it, and no other model's stream ever runs what was traced for it."""
    calls = owner.__dict__.setdefault("_compiled", {})
    key = (fn.__name__, compile_call)
    if key not in calls:
        calls[key] = compile_call(fn)
    return calls[key]


def compile_counts() -> dict[str, int]:
    """Dynamo's counters: graphs compiled ("unique_graphs") and frames it was asked to compile."""
    from torch._dynamo.utils import counters

    stats = counters["stats"]
    return {"unique_graphs": int(stats["unique_graphs"]), "calls_captured": int(stats["calls_captured"])}
