"""Text prompts -> umT5 embeddings, Wan2.1's text conditioning, through transformers; cached on disk.

A Wan base folder (the layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers) holds the tokenizer in
`tokenizer/` and `UMT5EncoderModel` in `text_encoder/`. A prompt is cleaned as Self-Forcing's
tokenizer wrapper does (HTML entities unescaped, whitespace collapsed), tokenized to `text_len`
tokens (512 for Wan2.1) with the closing `</s>`, padded on the right and truncated, and encoded; the
rows past the prompt's own tokens are zeroed (Self-Forcing's `WanTextEncoder`: `u[v:] = 0`).

The encoder is 11 GB in bf16 at full size, so `encode_prompts` loads it, encodes every prompt it
has not seen, and frees it before returning: the caller streams with the memory back. Each prompt's
embedding is cached as one safetensors file keyed by the encoder's identity, the exact text, the
token count and the dtype, so a second run of the same prompt never loads the encoder at all.
"""

from __future__ import annotations

import gc
import hashlib
import html
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from scd.errors import OutputError, TextError
from scd.files import atomic_write, check_output_folder

TOKENIZER_DIR = "tokenizer"
TEXT_ENCODER_DIR = "text_encoder"
TEXT_LEN = 512  # Wan2.1's text length (Self-Forcing's tokenizer seq_len)
CACHE_FORMAT = "1"  # bump when what a cached file holds, or how a prompt is cleaned, changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


@dataclass(frozen=True)
class TextEmbeddings:
    """What `encode_prompts` returns. `embeddings` is (B, text_len, D) on the CPU in the dtype asked
    for, one row per token; rows at and past `lengths[b]` are zero. `seconds` is the wall time of the
    whole call (cache reads, and when some prompt was new: loading, encoding, freeing the encoder)."""

    embeddings: torch.Tensor  # (B, text_len, D)
    lengths: tuple[int, ...]  # tokens of each prompt, its closing </s> included, at most text_len
    cached: tuple[bool, ...]  # which prompts came from the disk cache
    encoder_loaded: bool  # False when every prompt was a cache hit
    seconds: float


def clean_prompt(text: str) -> str:
    """Self-Forcing's `clean='whitespace'`: HTML entities unescaped (twice, as its wrapper does),
    runs of whitespace made one space, ends stripped. (Its ftfy mojibake repair is not applied: scd
    does not depend on ftfy, and text that needs it is rare.)"""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def default_cache_dir() -> Path:
    """Where embeddings are cached unless the caller says: `$SCD_CACHE/text`, else
    `$XDG_CACHE_HOME/scd/text` (`~/.cache/scd/text`)."""
    root = os.environ.get("SCD_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "scd")
    return Path(os.path.expandvars(root)).expanduser() / "text"


def _folders(base) -> tuple[Path, Path]:
    base = Path(base).expanduser()
    if not base.is_dir():
        raise TextError(f"the base folder {base} does not exist: give a folder in the Wan2.1 Diffusers layout "
                        "(tokenizer/, text_encoder/, vae/, transformer/) or the Hub repo it came from", "base")
    tokenizer, encoder = base / TOKENIZER_DIR, base / TEXT_ENCODER_DIR
    for folder, what in ((tokenizer, "tokenizer"), (encoder, "text encoder (umT5)")):
        if not folder.is_dir():
            raise TextError(f"the base folder {base} has no {folder.name}/ folder (the {what}): download the whole "
                            "base again, or point at a base in the Wan2.1 Diffusers layout", "base")
    if not (encoder / "config.json").is_file():
        raise TextError(f"{encoder} has no config.json: download the base's text_encoder/ again", "base")
    return tokenizer, encoder


def encoder_identity(base, revision: str | None = None) -> str:
    """The text encoder's identity, the part of a cache key that says which encoder made an
    embedding. With `revision` (for a Hub base, `owner/name@commit`) that string, as it is. Else a
    hash of `tokenizer/` and `text_encoder/`: every small file's content, and each weights file's
    name and size, plus its blob name when it is a link into the Hub cache (there the blob name is
    the file's sha256), so even 11 GB of weights are identified without being read."""
    if revision:
        return f"revision:{revision}"
    digest = hashlib.sha256()
    base = Path(base).expanduser()
    for folder in _folders(base):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(base).as_posix()
            if path.suffix in WEIGHT_SUFFIXES:
                real = Path(os.path.realpath(path))
                blob = real.name if real.name != path.name else ""
                digest.update(f"{name}\0{path.stat().st_size}\0{blob}\n".encode())
            else:
                digest.update(f"{name}\0".encode() + hashlib.sha256(path.read_bytes()).digest() + b"\n")
    return f"files:{digest.hexdigest()}"


def _transformers():
    """transformers, imported on first use: it is the optional extra `wan`."""
    try:
        import transformers
    except ImportError:
        raise TextError("text prompts need transformers (umT5), which is not installed: "
                        "run `pip install 'scd[wan]'`") from None
    return transformers


@contextmanager
def _quiet(transformers):
    """transformers logs warnings and draws a progress bar while loading; the library never prints."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class TextEncoder:
    """umT5's tokenizer and encoder, loaded from a base folder. Prefer `encode_prompts`, which also
    caches and frees; this is for a caller that keeps the encoder (a benchmark, a server)."""

    def __init__(self, tokenizer, model):
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def load(cls, base, device="cpu", dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load `base/tokenizer/` (AutoTokenizer) and `base/text_encoder/` (UMT5EncoderModel, every
        weight accounted for) onto `device` in `dtype`. Raises TextError."""
        tokenizer_dir, encoder_dir = _folders(base)
        transformers = _transformers()
        try:
            config = json.loads((encoder_dir / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TextError(f"cannot read {encoder_dir / 'config.json'}: {err}", "base") from None
        if not isinstance(config, dict) or config.get("model_type") != "umt5":
            raise TextError(f"{encoder_dir} is not a umT5 encoder (config.json's model_type is "
                            f"{config.get('model_type') if isinstance(config, dict) else None!r}, not 'umt5')", "base")
        with _quiet(transformers):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
            except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a bad folder
                raise TextError(f"cannot load the tokenizer in {tokenizer_dir}: {_first_line(err)}", "base") from None
            if tokenizer.pad_token_id is None:
                raise TextError(f"the tokenizer in {tokenizer_dir} has no pad token, so prompts cannot be padded to "
                                "a fixed length: download the base's tokenizer/ again", "base")
            tokenizer.padding_side = "right"  # rows past a prompt's length are its padding: zeroed below
            dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            try:
                model, info = transformers.UMT5EncoderModel.from_pretrained(
                    str(encoder_dir), output_loading_info=True, **{dtype_arg: dtype})
            except Exception as err:  # a missing or corrupt weights file, a mis-shaped tensor...
                reason = ("its tensors do not have the shapes its config.json says" if "mismatched_sizes" in str(err)
                          else _first_line(err))
                raise TextError(f"cannot load the text encoder in {encoder_dir} ({reason}): download the base's "
                                "text_encoder/ again", "base") from None
        wrong = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        wrong = {k: v for k, v in wrong.items() if v}
        if wrong:
            detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}{' ...' if len(v) > 3 else ''}"
                               for k, v in wrong.items())
            raise TextError(f"the text encoder in {encoder_dir} does not match its config ({detail}): "
                            "download the base's text_encoder/ again", "base")
        return cls(tokenizer, model.to(device).eval().requires_grad_(False))

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    def encode(self, prompts: Sequence[str], text_len: int = TEXT_LEN, batch_size: int = 8
               ) -> tuple[torch.Tensor, list[int]]:
        """Cleaned prompts -> (embeddings (B, text_len, D) on the CPU, zero past each prompt's
        length; lengths). Prompts are run `batch_size` at a time."""
        device = next(self.model.parameters()).device
        parts, lengths = [], []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start:start + batch_size]), padding="max_length",
                                    max_length=text_len, truncation=True, add_special_tokens=True,
                                    return_attention_mask=True, return_tensors="pt")
            mask = tokens.attention_mask.to(device)  # (b, text_len): 1 on the prompt's tokens, 0 on padding
            with torch.no_grad():
                out = self.model(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
            parts.append((out * mask[..., None].to(out.dtype)).cpu())  # (b, text_len, D), padding rows zero
            lengths += mask.sum(dim=1).tolist()
        return torch.cat(parts), [int(n) for n in lengths]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cache_key(identity: str, text: str, text_len: int, dtype: torch.dtype) -> dict[str, str]:
    return {"format": CACHE_FORMAT, "encoder": identity, "text_len": str(text_len), "dtype": _dtype_name(dtype),
            "text": text}


def _cache_path(cache_dir: Path, key: dict[str, str]) -> Path:
    return cache_dir / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".safetensors")


def _read_cached(path: Path, key: dict[str, str]) -> torch.Tensor | None:
    """The cached (length, D) embedding, or None for a miss; an unreadable or foreign file is a miss
    (it is written again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if any(metadata.get(k) != v for k, v in key.items()):
                return None
            rows = f.get_tensor("embeddings")
    except Exception:  # safetensors raises SafetensorError, OSError, ValueError... for a damaged file
        return None
    if rows.ndim != 2 or rows.shape[0] > int(key["text_len"]) or str(metadata.get("length")) != str(rows.shape[0]):
        return None
    return rows


def _write_cached(path: Path, key: dict[str, str], rows: torch.Tensor) -> None:
    from safetensors.torch import save_file

    metadata = {**key, "length": str(rows.shape[0])}
    atomic_write(path, lambda tmp: save_file({"embeddings": rows.contiguous()}, str(tmp), metadata=metadata),
                 OutputError, "text-embedding cache file")


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_prompts(base, prompts: str | Sequence[str], *, text_len: int = TEXT_LEN, cache_dir=None,
                   revision: str | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                   use_cache: bool = True, batch_size: int = 8) -> TextEmbeddings:
    """Embed `prompts` (one string, or several: a batch) with the umT5 of the Wan base folder `base`.

    Returns `TextEmbeddings`: (B, text_len, D) on the CPU in `dtype` (D = 4096 for Wan2.1), rows past
    each prompt's tokens zero. Prompts found in `cache_dir` (default `default_cache_dir()`) are read
    from there; the others are encoded by the text encoder, loaded onto `device` in `dtype` for this
    call only and freed (del + gc, and the CUDA cache emptied) before returning, then cached. When
    every prompt is a hit the encoder is never loaded and its weights are never read.
    `revision` names the encoder in the cache key (see `encoder_identity`); `use_cache=False`
    neither reads nor writes the cache.

    Raises TextError (an empty prompt, text_len < 1, a base without tokenizer/ or text_encoder/, an
    encoder that does not load) and OutputError (a cache folder that cannot be written).
    """
    started = time.perf_counter()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise TextError("no prompt given: give at least one text prompt", "prompt")
    cleaned = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TextError(f"prompt {i + 1} is {type(text).__name__}, not text", "prompt")
        if not clean_prompt(text):
            where = f"prompt {i + 1} of {len(texts)}" if len(texts) > 1 else "the prompt"
            raise TextError(f"{where} is empty: give the text of the video to make", "prompt")
        cleaned.append(clean_prompt(text))
    if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 1:
        raise TextError(f"text_len must be a whole number >= 1 (Wan2.1 uses {TEXT_LEN}), not {text_len!r}", "text_len")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TextError(f"batch_size must be a whole number >= 1, not {batch_size!r}", "batch_size")
    identity = encoder_identity(base, revision)  # also checks the folders before any work

    rows: list[torch.Tensor | None] = [None] * len(texts)
    keys, paths = [None] * len(texts), [None] * len(texts)
    if use_cache:
        cache_dir = check_output_folder(cache_dir if cache_dir is not None else default_cache_dir(),
                                        "text-embedding cache folder")
        for i, text in enumerate(texts):
            keys[i] = _cache_key(identity, text, text_len, dtype)
            paths[i] = _cache_path(cache_dir, keys[i])
            rows[i] = _read_cached(paths[i], keys[i])
    cached = tuple(r is not None for r in rows)

    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        unique = list(dict.fromkeys(cleaned[i] for i in missing))  # a prompt given twice is encoded once
        encoder = TextEncoder.load(base, device, dtype)
        try:
            computed, lengths = encoder.encode(unique, text_len, batch_size)
        finally:
            del encoder
            _free(device)
        by_text = {text: computed[j, :lengths[j]] for j, text in enumerate(unique)}  # (length, D) each
        if use_cache:
            _make_folder(cache_dir)
        for i in missing:
            rows[i] = by_text[cleaned[i]]
            if use_cache:
                _write_cached(paths[i], keys[i], rows[i])

    width = {int(r.shape[1]) for r in rows}
    if len(width) != 1:
        raise TextError(f"cached embeddings of widths {sorted(width)} for one encoder: clear the cache folder "
                        f"{cache_dir} and run again", "prompt")
    embeddings = torch.zeros(len(texts), text_len, width.pop(), dtype=dtype)  # (B, text_len, D)
    for i, r in enumerate(rows):
        embeddings[i, :r.shape[0]] = r
    return TextEmbeddings(embeddings, tuple(int(r.shape[0]) for r in rows), cached, bool(missing),
                          time.perf_counter() - started)


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot make the text-embedding cache folder {folder}: "
                          f"{err.strerror.lower() if err.strerror else err}") from None
