"""Layers of the FAR-style family, shared by the SCD encoder, decoder and the baseline: embedders,
rotary tables, the adaLN-Zero block, the output norm, patchify. Parameter names follow the
reference implementations (the official SCD code and FAR), so their state dicts load unrenamed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- embedders

def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) float32, cosines first (diffusers' flip_sin_to_cos, shift 1)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    angles = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, width: int, channels: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(channels, width)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = timestep_sinusoid(t).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(x)))


class LabelEmbedding(nn.Module):
    """Class or action table with one extra row, the null index used for guidance."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


def rope_tables(frames: torch.Tensor, rows: int, cols: int, axes: tuple[int, int, int],
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for tokens at (frame, row, col), frame-major: (cos, signed sin), each
    (len(frames)*rows*cols, sum(axes)) float32. The sine is negated on the even lanes of each pair,
    so that `apply_rope` rotates with one swap and two multiplies."""
    device = frames.device
    spatial = _spatial_angles(rows, cols, axes, theta, device)  # (T, axes[1] + axes[2])
    time = torch.outer(frames.double(), _frequencies(axes[0], theta, device)).repeat_interleave(2, dim=1)  # (F, axes[0])
    t = rows * cols
    angles = torch.cat([time[:, None].expand(-1, t, -1), spatial[None].expand(len(frames), -1, -1)], -1).flatten(0, 1)
    sign = torch.tensor([-1.0, 1.0], dtype=torch.float32, device=device).repeat(angles.shape[-1] // 2)
    return angles.cos().float(), angles.sin().float() * sign


def _frequencies(dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def _spatial_angles(rows: int, cols: int, axes: tuple[int, int, int], theta: float, device) -> torch.Tensor:
    """(rows*cols, axes[1] + axes[2]) float64 angles of the row and column axes, pairs interleaved."""
    r = torch.arange(rows, dtype=torch.float64, device=device).repeat_interleave(cols)
    c = torch.arange(cols, dtype=torch.float64, device=device).repeat(rows)
    return torch.cat([torch.outer(r, _frequencies(axes[1], theta, device)).repeat_interleave(2, dim=1),
                      torch.outer(c, _frequencies(axes[2], theta, device)).repeat_interleave(2, dim=1)], 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., hd) by the tables of `rope_tables` (cast to x's dtype
    once, by whoever made them), shaped to broadcast against x: (a, b) -> (a cos - b sin, b cos + a sin)."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) per pair
    return torch.addcmul(x * cos, swapped, sin)


# ----------------------------------------------------------------------------- the block

class Modulation(NamedTuple):
    """Every adaLN projection of a transformer for one conditioning: `blocks[i]` the six tensors of
    block i, `output` those of the output norm; each (..., F, 1, D). Computed once per frame for
    all its denoising steps, and per step only indexed. A tuple, so compiled code takes it as such."""

    blocks: tuple
    output: tuple

    def at(self, k: int) -> "Modulation":
        """Step k of one made with a leading steps dimension (what compiled code indexes)."""
        return Modulation(tuple(tuple(t[k] for t in block) for block in self.blocks), tuple(t[k] for t in self.output))

    def steps(self) -> list["Modulation"]:
        """One made with a leading steps dimension, split into one per step (views)."""
        blocks = [[t.unbind(0) for t in block] for block in self.blocks]
        output = [t.unbind(0) for t in self.output]
        count = len(blocks[0][0]) if blocks else len(output[0])
        return [Modulation(tuple(tuple(t[k] for t in block) for block in blocks), tuple(t[k] for t in output))
                for k in range(count)]

    def tensors(self) -> list[torch.Tensor]:
        return [t for block in self.blocks for t in block] + list(self.output)


class AdaNormZero(nn.Module):
    """LayerNorm modulated by (shift, scale) and a residual gate from the conditioning embedding."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, 3 * width)

    def modulation(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """silu(emb) (..., F, D) -> (shift, 1 + scale, gate), each (..., F, 1, D): per frame,
        broadcast over its tokens."""
        shift, scale, gate = self.linear(act).unsqueeze(-2).chunk(3, dim=-1)
        return shift, 1 + scale, gate

    def forward(self, x: torch.Tensor, modulation) -> torch.Tensor:
        shift, scale, _ = modulation
        return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=1e-6), scale)


class FusedLinear(nn.Linear):
    """`parts` linear layers of the same input stacked into one matmul. Initialised part by part
    as `parts` separate nn.Linear layers would be, in their order (same random draws)."""

    def __init__(self, width: int, out: int, parts: int):
        self.parts = parts
        super().__init__(width, parts * out)

    def reset_parameters(self) -> None:
        for weight, bias in zip(self.weight.chunk(self.parts), self.bias.chunk(self.parts)):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)


class Attention(nn.Module):
    """Multi-head attention with qk RMSNorm and RoPE. q, k and v are one matmul (`to_qkv`); the
    state dict keeps the references' `to_q`, `to_k`, `to_v` entries, split on save, fused on load."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_qkv = FusedLinear(width, heads * head_dim, 3)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, width)])
        self.register_state_dict_post_hook(_split_qkv)
        self.register_load_state_dict_pre_hook(_fuse_qkv)

    def forward(self, x, rope, mask=None, cache: tuple[torch.Tensor, torch.Tensor] | None = None, layer: int = 0,
                write_at: int | torch.Tensor | None = None, attend: int | None = None) -> torch.Tensor:
        """x (B, S, D). Without a cache (keys, values of every layer): attend within x. With one: write this chunk's keys at token
        offset `write_at` (an int, or a (S,) index tensor: static shapes) and attend to the cache's
        first `attend` tokens (None: all of it, `mask` saying which to see)."""
        qkv = self.to_qkv(x).unflatten(-1, (3, self.heads, self.head_dim))  # (B, S, 3, H, hd)
        # q and k normed and rotated as one tensor: half the small ops of doing each apart
        weight = torch.stack([self.norm_q.weight, self.norm_k.weight])[:, None]  # (2, 1, hd)
        qk = F.rms_norm(qkv[:, :, :2], (self.head_dim,), eps=self.norm_q.eps) * weight
        cos, sin = rope
        q, k = apply_rope(qk, cos[:, None, None], sin[:, None, None]).permute(2, 0, 3, 1, 4)  # (B, H, S, hd) each
        v = qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            keys, values = cache[0][layer], cache[1][layer]
            if isinstance(write_at, torch.Tensor):
                keys.index_copy_(2, write_at, k)
                values.index_copy_(2, write_at, v)
            else:
                keys[:, :, write_at:write_at + k.shape[2]] = k
                values[:, :, write_at:write_at + k.shape[2]] = v
            k, v = (keys, values) if attend is None else (keys[:, :, :attend], values[:, :, :attend])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


def _split_qkv(module: Attention, state: dict, prefix: str, local_metadata) -> None:
    for name in ("weight", "bias"):
        fused = state.pop(prefix + "to_qkv." + name)
        for part, tensor in zip(("to_q", "to_k", "to_v"), fused.chunk(3)):
            state[f"{prefix}{part}.{name}"] = tensor.clone()  # its own storage: safetensors refuses shared ones


def _fuse_qkv(module: Attention, state: dict, prefix: str, *args) -> None:
    for name in ("weight", "bias"):
        parts = [f"{prefix}{part}.{name}" for part in ("to_q", "to_k", "to_v")]
        if all(key in state for key in parts):
            state[prefix + "to_qkv." + name] = torch.cat([state.pop(key) for key in parts])


class FeedForward(nn.Module):
    def __init__(self, width: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([nn.Module(), nn.Identity(), nn.Linear(mult * width, width)])
        self.net[0].proj = nn.Linear(width, mult * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class Block(nn.Module):
    """adaLN-Zero transformer block: modulated norm -> attention (qk RMSNorm, RoPE) -> gated
    residual, then the same around a tanh-GELU MLP. Serves the encoder, decoder and baseline."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(width)
        self.attn = Attention(width, heads, head_dim)
        self.norm2 = AdaNormZero(width)
        self.mlp = FeedForward(width)

    def modulation(self, act: torch.Tensor) -> tuple:
        """silu(emb) (..., F, D) -> the six (..., F, 1, D) modulation tensors of this block."""
        return self.norm1.modulation(act) + self.norm2.modulation(act)

    def forward(self, x, modulation, rope, mask=None, cache=None, layer=0, write_at=None, attend=None):
        # x (B, F, T, D); modulation: this block's six tensors (B, F, 1, D)
        h = self.attn(self.norm1(x, modulation[:3]).flatten(1, 2), rope, mask, cache, layer, write_at, attend)
        x = torch.addcmul(x, modulation[2], h.view_as(x))
        h = self.mlp(self.norm2(x, modulation[3:]))
        return torch.addcmul(x, modulation[5], h)


class OutputNorm(nn.Module):
    """Final LayerNorm modulated by (scale, shift), in that order, as in the references."""

    def __init__(self, width: int, unconditional: bool = False, noise: float = 0.0):
        super().__init__()
        self.linear = None if unconditional else nn.Linear(width, 2 * width)
        self.noise = noise  # training-time feature noise (SCD encoder)

    def modulation(self, act: torch.Tensor) -> tuple:
        """silu(emb) (..., F, D) -> (1 + scale, shift), each (..., F, 1, D); () when unconditional."""
        if self.linear is None:
            return ()
        scale, shift = self.linear(act).unsqueeze(-2).chunk(2, dim=-1)
        return 1 + scale, shift

    def forward(self, x: torch.Tensor, emb, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, F, T, D); emb: the conditioning (B, F, D) or its `Modulation`. `noise` (like x) is
        added after the norm, before the modulation: decoder guidance's unconditional features (the
        official `cfg_type: decoder`)."""
        modulation = emb.output if isinstance(emb, Modulation) else self.modulation(F.silu(emb))
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        if self.training and self.noise > 0:
            x = x + self.noise * torch.randn_like(x)
        if noise is not None:
            x = x + noise.to(x.dtype)
        if not modulation:
            return x
        scale, shift = modulation
        return torch.addcmul(shift, x, scale)


# ----------------------------------------------------------------------------- tokens

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, F, C, H, W) -> (B, F, T, C*p*p), tokens in row-major order."""
    b, f, c, h, w = x.shape
    x = x.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, f, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int) -> torch.Tensor:
    """(B, F, T, C*p*p) -> (B, F, C, H, W)."""
    b, f, _, cpp = tokens.shape
    c = cpp // (p * p)
    x = tokens.reshape(b, f, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, f, c, h, w)


def block_causal_mask(frames: int, past_frames: int, tokens_per_frame: int, device) -> torch.Tensor:
    """Boolean (frames*T, (past+frames)*T): a token sees every token of its own and earlier frames."""
    q = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame) + past_frames
    k = torch.arange(past_frames + frames, device=device).repeat_interleave(tokens_per_frame)
    return k[None, :] <= q[:, None]
