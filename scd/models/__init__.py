"""The models `scd` runs, one family per file, all speaking `StreamingModel` (streaming.py).

- config.py     every family's configuration (the config.json contract) and the size presets
- streaming.py  the streaming protocol and the state a stream keeps (its KV cache)
- layers.py     the FAR-style family's layers (embedders, rotary tables, the adaLN-Zero block)
- far.py        the FAR-style family: the SCD encoder + decoder and the causal baseline
- wan.py        the Wan2.1 family: Wan's text-to-video transformer, causal, streamed in chunks

`build_model(config)` builds a model of any family from its config; `load_config(data)` reads a
config.json of any family. Nothing outside this package asks which family a model is.
"""

from __future__ import annotations

from scd.models import far, wan
from scd.models.config import (
    ARCHS,
    CODEC_TYPES,
    CONDITIONS,
    DECODER_COMBINES,
    FORMAT_VERSION,
    GUIDANCE_MODES,
    LIMITS,
    PRESET_CHANNELS,
    PRESET_HEAD_DIM,
    PRESET_PATCH,
    PRESET_ROPE,
    PRESETS,
    CodecConfig,
    ModelConfig,
    WanConfig,
    config_from_dict,
    default_rope_axes,
    load_config,
    preset,
    preset_sizes,
)
from scd.models.far import (
    PREFILL_CHUNK,
    ROPE_BLOCK_BYTES,
    TABLE_BYTES,
    Baseline,
    ConditionTable,
    Decoder,
    Encoder,
    SCDModel,
    Transformer,
    init_weights,
    table_fits,
    teacher_forcing_mask,
)
from scd.models.layers import (
    AdaNormZero,
    Attention,
    Block,
    FeedForward,
    FusedLinear,
    LabelEmbedding,
    Modulation,
    OutputNorm,
    TimestepEmbedding,
    apply_rope,
    block_causal_mask,
    patchify,
    rope_tables,
    timestep_sinusoid,
    unpatchify,
)
from scd.models.streaming import KVCache, Objective, StreamingModel, StreamState

FAMILIES = {"far": far.build, "wan": wan.build}  # family name (config.family) -> the function that builds it


def build_model(config, init: bool = True) -> StreamingModel:
    """A new model of `config`'s family, initialised as its reference does (or left as allocated)."""
    return FAMILIES[config.family](config, init)


__all__ = [
    "ARCHS", "CODEC_TYPES", "CONDITIONS", "DECODER_COMBINES", "FORMAT_VERSION", "GUIDANCE_MODES", "LIMITS",
    "PREFILL_CHUNK", "PRESETS", "PRESET_CHANNELS", "PRESET_HEAD_DIM", "PRESET_PATCH", "PRESET_ROPE", "ROPE_BLOCK_BYTES",
    "TABLE_BYTES", "FAMILIES", "WanConfig", "config_from_dict", "load_config", "AdaNormZero", "Attention", "Baseline", "Block", "CodecConfig", "ConditionTable", "Decoder",
    "Encoder", "FeedForward", "FusedLinear", "KVCache", "LabelEmbedding", "ModelConfig", "Modulation", "Objective",
    "OutputNorm", "SCDModel", "StreamState", "StreamingModel", "TimestepEmbedding", "Transformer", "apply_rope",
    "block_causal_mask", "build_model", "default_rope_axes", "init_weights", "patchify", "preset", "preset_sizes",
    "rope_tables", "table_fits", "teacher_forcing_mask", "timestep_sinusoid", "unpatchify",
]
