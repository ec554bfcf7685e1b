"""A small decoder-only language model whose attention is nsa_torch.NativeSparseAttention, or
full causal attention (SDPA) on the same projections and rotary embedding for comparison.

Decoding (examples/generate.py): `cache = model.new_cache(B, capacity, dtype)` gives one cache per
layer (nsa_torch.NSACache, or the dense baseline's StaticKVCache); `model(prompt, cache=cache)`
prefills it and `model(next_tokens, cache=cache)` then runs the next tokens of every sequence, a
step of fixed shapes that a CUDA graph can capture (each cache's sync_lengths() after replays)."""
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import nsa_torch
from nsa_torch.modules import FullAttention, StaticKVCache


@dataclass
class ModelConfig:
    vocab: int = 48
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    attn: str = "nsa"           # "nsa" or "sdpa"
    rope_theta: float = 10000.0
    # NativeSparseAttention keyword arguments (block_size, ..., window_size, compression); its
    # defaults are the paper's
    nsa: dict = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.hidden)
        if cfg.attn == "nsa":
            self.attn = nsa_torch.NativeSparseAttention(cfg.hidden, cfg.heads, cfg.kv_heads,
                                                        cfg.head_dim, rope_theta=cfg.rope_theta,
                                                        **cfg.nsa)
        elif cfg.attn == "sdpa":
            # K/V repeated to every query head rather than enable_gqa, which some SDPA backends
            # refuse (torch then falls back to the T x T math kernel)
            self.attn = FullAttention(cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim,
                                      rope_theta=cfg.rope_theta, gqa=False)
        else:
            raise ValueError(f"attn must be 'nsa' or 'sdpa', got {cfg.attn!r}")
        self.norm2 = nn.RMSNorm(cfg.hidden)
        inner = 8 * cfg.hidden // 3
        self.w_in = nn.Linear(cfg.hidden, 2 * inner, bias=False)   # SwiGLU
        self.w_out = nn.Linear(inner, cfg.hidden, bias=False)

    def forward(self, x, cu_seqlens=None, cache=None):
        x = x + self.attn(self.norm1(x), cu_seqlens=cu_seqlens, cache=cache)
        a, b = self.w_in(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w_out(F.silu(a) * b)


class TinyLM(nn.Module):
    def __init__(self, cfg: ModelConfig, checkpointing=False):
        super().__init__()
        self.cfg, self.checkpointing = cfg, checkpointing
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=cfg.hidden ** -0.5)

    def forward(self, tokens, cu_seqlens=None, cache=None):
        """tokens [B, T] -> logits [B, T, vocab]; with cu_seqlens (int32 [N + 1], best on the CPU:
        see NativeSparseAttention) tokens [1, total] packs N sequences that do not see each other.
        cache (new_cache's): empty, the forward fills it; filled, tokens are the next T of each
        of its B sequences."""
        x = self.embed(tokens)
        for i, blk in enumerate(self.blocks):
            if cache is not None:
                x = blk(x, cu_seqlens, cache[i])
            elif self.checkpointing and self.training:
                x = checkpoint(blk, x, cu_seqlens, use_reentrant=False)
            else:
                x = blk(x, cu_seqlens)
        return self.head(self.norm(x))

    def new_cache(self, batch_size, capacity, dtype=None):
        """An empty decoding cache for batch_size sequences of up to `capacity` tokens: one per
        layer, on the model's device, in `dtype`: the dtype the attention runs in (bfloat16
        under CUDA autocast; by default the layers' own choice)."""
        make = nsa_torch.NSACache if self.cfg.attn == "nsa" else StaticKVCache.for_layer
        return [make(blk.attn, batch_size, capacity, dtype=dtype) for blk in self.blocks]


def answer_hits(logits, tokens, mask):
    """(rows [B] bool: every scored next token predicted by argmax, predicted scored tokens,
    scored tokens) for mask = the positions whose next token is scored."""
    right = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    scored = mask[:, :-1]
    return (right | ~scored).all(dim=1), int((right & scored).sum()), int(scored.sum())


def masked_loss(logits, tokens, mask, reduction="mean"):
    """Cross-entropy of the next token where mask (positions whose next token is scored); mean
    or sum over those positions, or each position's ("none": [B, T - 1], 0 where not scored).
    Every position's loss is computed and the unscored ones zeroed: picking the scored ones
    (pred[mask]) would make the host wait for the device to learn their count, at every step."""
    pred = logits[:, :-1].float()
    target = tokens[:, 1:]
    sel = mask[:, :-1]
    each = F.cross_entropy(pred.transpose(1, 2), target, reduction="none") * sel
    if reduction == "none":
        return each
    if reduction == "sum":
        return each.sum()
    return each.sum() / sel.sum()
