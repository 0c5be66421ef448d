"""A tiny random Wan2.1 base folder, for tests: the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
(model_index.json, tokenizer/, text_encoder/, vae/, transformer/config.json, scheduler/), with a
word-level tokenizer, a umT5 of width 32 (91 kB) and a VAE of 62k parameters. Deterministic
from its seed: the same call writes the same weights.

    from wan_base import make_wan_base  # tests/ is on sys.path, as for conftest
    base = make_wan_base(tmp_path / "base", seed=0, num_layers=2, num_attention_heads=2, attention_head_dim=8)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# the tokenizer's vocabulary (lower-cased, split at whitespace and punctuation); any other word is <unk>
WORDS = ("a an the of in on through over under with and fox cat dog bird fish horse running walking flying "
         "swimming jumping sitting fresh snow rain sun sky sea river forest city street night day red blue "
         "green white black small big slowly quickly camera view video").split()
SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as umT5's (pad 0, eos 1, unk 2)
Z_DIM = 4  # latent channels of the tiny VAE (Wan2.1's is 16)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_tokenizer(folder: Path, words=WORDS) -> None:
    """A word-level fast tokenizer (the `tokenizers` library) that appends </s> as umT5's does, saved
    as a transformers PreTrainedTokenizerFast so that AutoTokenizer loads it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", vocab["</s>"])])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                   "model_max_length": 512, "padding_side": "right", **special})


def write_text_encoder(folder: Path, vocab_size: int, d_model: int = 32, num_layers: int = 2, num_heads: int = 4,
                       d_ff: int = 64, seed: int = 0) -> None:
    """A random UMT5EncoderModel, saved with save_pretrained (config.json + model.safetensors)."""
    from transformers import UMT5Config, UMT5EncoderModel
    from transformers.utils import logging

    config = UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                        is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        if bars:
            logging.enable_progress_bar()


def vae_config(z_dim: int = Z_DIM, base_dim: int = 8, seed: int = 0) -> dict:
    """A tiny AutoencoderKLWan's arguments: Wan2.1's shape (8x space over four stages, 4x time) at
    width `base_dim`, with a latent mean and std per channel drawn from `seed`."""
    g = torch.Generator().manual_seed(seed + 1)
    return dict(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0,
                latents_mean=[round(v, 4) for v in (torch.randn(z_dim, generator=g) * 0.5).tolist()],
                latents_std=[round(v, 4) for v in (torch.rand(z_dim, generator=g) * 2 + 0.5).tolist()])


def random_vae(z_dim: int = Z_DIM, base_dim: int = 8, seed: int = 0):
    """A random AutoencoderKLWan of `vae_config`, its weights widened from the default init so that
    every layer visibly shapes the output."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**vae_config(z_dim, base_dim, seed))
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.5)
    return vae.eval()


def write_vae(folder: Path, z_dim: int = Z_DIM, base_dim: int = 8, seed: int = 0) -> None:
    """`random_vae` saved with save_pretrained (config.json + diffusion_pytorch_model.safetensors)."""
    random_vae(z_dim, base_dim, seed).save_pretrained(str(folder), safe_serialization=True)


def transformer_config(num_layers: int = 2, num_attention_heads: int = 2, attention_head_dim: int = 8,
                       in_channels: int = Z_DIM, out_channels: int | None = None, text_dim: int = 32,
                       ffn_dim: int = 32, freq_dim: int = 16, patch_size=(1, 2, 2), **overrides) -> dict:
    """A WanTransformer3DModel config.json of a tiny size, with the real one's keys (Wan2.1-T2V-1.3B:
    30 layers, 12 heads of 128, ffn 8960, freq 256, text 4096, 16 channels)."""
    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0",
              "added_kv_proj_dim": None, "attention_head_dim": attention_head_dim, "cross_attn_norm": True,
              "eps": 1e-06, "ffn_dim": ffn_dim, "freq_dim": freq_dim, "image_dim": None,
              "in_channels": in_channels, "num_attention_heads": num_attention_heads, "num_layers": num_layers,
              "out_channels": out_channels if out_channels is not None else in_channels,
              "patch_size": list(patch_size), "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
              "text_dim": text_dim}
    config.update(overrides)
    return config


def model_index() -> dict:
    """The real base's model_index.json."""
    return {"_class_name": "WanPipeline", "_diffusers_version": "0.33.0.dev0",
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"]}


def scheduler_config() -> dict:
    """The real base's scheduler/scheduler_config.json (UniPC with flow sigmas, shift 3)."""
    return {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0",
            "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [],
            "dynamic_thresholding_ratio": 0.995, "final_sigmas_type": "zero", "flow_shift": 3.0,
            "lower_order_final": True, "num_train_timesteps": 1000, "predict_x0": True,
            "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
            "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
            "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
            "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}


def make_wan_base(path, *, seed: int = 0, d_model: int = 32, text_layers: int = 2, text_heads: int = 4,
                  z_dim: int = Z_DIM, vae_base_dim: int = 8, words=WORDS, scheduler: bool = True,
                  **transformer) -> Path:
    """Write a tiny random Wan2.1 base at `path` (created) and return it. `d_model` is the umT5's
    width and so the transformer's text_dim; `z_dim` the VAE's latent channels and so the
    transformer's in/out channels; `transformer` overrides `transformer_config`'s sizes
    (num_layers, num_attention_heads, attention_head_dim, ffn_dim, freq_dim, patch_size, ...).
    Only transformer/config.json is written: a generator checkpoint supplies the weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "model_index.json", model_index())
    write_tokenizer(path / "tokenizer", words)
    write_text_encoder(path / "text_encoder", vocab_size=len(SPECIAL) + len(dict.fromkeys(words)), d_model=d_model,
                       num_layers=text_layers, num_heads=text_heads, d_ff=2 * d_model, seed=seed)
    write_vae(path / "vae", z_dim=z_dim, base_dim=vae_base_dim, seed=seed)
    transformer.setdefault("text_dim", d_model)
    transformer.setdefault("in_channels", z_dim)
    _write_json(path / "transformer" / "config.json", transformer_config(**transformer))
    if scheduler:
        _write_json(path / "scheduler" / "scheduler_config.json", scheduler_config())
    return path


def write_generator(path, base, std: float = 0.3, seed: int = 0) -> Path:
    """A random causal generator sized by `base`'s transformer config, in Self-Forcing's checkpoint
    format (`generator_ema` with the `model.` prefix, a zero `generator` beside it), at `path`."""
    import torch

    from scd.models import build_model
    from scd.wan_reference import wan_config

    path = Path(path)
    torch.manual_seed(seed)
    model = build_model(wan_config(path.with_name("none.pt"), base))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    ema = {"model." + k: v for k, v in model.state_dict().items()}
    torch.save({"generator": {k: torch.zeros_like(v) for k, v in ema.items()}, "generator_ema": ema}, path)
    return path
