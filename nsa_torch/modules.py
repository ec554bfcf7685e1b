"""The trainable NSA layer: hidden states in, hidden states out.

    layer = nsa_torch.NativeSparseAttention(hidden_size=1024, num_heads=16, num_kv_heads=1,
                                            head_dim=64)
    y = layer(x)                                   # x [B, T, hidden] -> y [B, T, hidden]
    y = layer(x_packed, cu_seqlens=cu_seqlens)     # varlen: x [1, total, hidden]
    cache = nsa_torch.NSACache(layer, batch_size=B, capacity=4096)
    y = layer(prompt, cache=cache)                 # prefill, then decode:
    y = layer(next_tokens, cache=cache)            # [B, S, hidden], the next S tokens of each

The layer owns the query/key/value/output projections, the compression function phi that turns
each window of `block_size` keys (values) into one compressed key (value), and the gate
projection (linear + sigmoid, one gate per query head per branch). Everything else is
`nsa_torch.nsa_attention` (or its branches, with `separate_branch_kv=True`).

Rotary embeddings (rotate-half convention, as in Llama and Hugging Face): queries and the keys of
the selected and window branches are rotated at their token positions; compressed keys are built
from the un-rotated keys of their window and then rotated at the position of the window's last
token, (i * block_stride + block_size - 1) in the sequence: the first query that sees compressed
token i is that token, so the relative distance of every visible compressed key is >= 0. Values
are not rotated.
"""
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import functional as nsa_fn
from .cache import DeviceConstants, NSACache
from .reference import num_cmp_tokens

_COMPRESSIONS = ("mlp", "mean", "linear")


@dataclass
class NSAConfig:
    """The arguments of NativeSparseAttention (see its docstring)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: Optional[int] = None
    block_size: int = 32
    block_stride: int = 16
    select_size: int = 64
    num_selected: int = 16
    num_initial: int = 1
    num_local: int = 2
    window_size: int = 512
    compression: str = "mlp"
    rope_theta: float = 10000.0
    separate_branch_kv: bool = False
    bias: bool = False

    def __post_init__(self):
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        where = "nsa_torch.NSAConfig"
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "v_head_dim",
                     "block_size", "block_stride", "select_size", "num_selected", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
        for name in ("num_initial", "num_local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: {name} must be an int >= 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{where}: num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"{where}: head_dim must be even (rotary embeddings rotate pairs), "
                             f"got {self.head_dim}")
        if self.block_size % self.block_stride:
            raise ValueError(f"{where}: block_size ({self.block_size}) must be a multiple of "
                             f"block_stride ({self.block_stride})")
        if self.select_size % self.block_stride:
            raise ValueError(f"{where}: select_size ({self.select_size}) must be a multiple of "
                             f"block_stride ({self.block_stride})")
        if self.num_selected < self.num_initial + self.num_local:
            raise ValueError(f"{where}: num_selected ({self.num_selected}) must be >= num_initial "
                             f"+ num_local ({self.num_initial} + {self.num_local})")
        if self.compression not in _COMPRESSIONS:
            raise ValueError(f"{where}: compression must be one of {_COMPRESSIONS}, got "
                             f"{self.compression!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"{where}: rope_theta must be > 0, got {self.rope_theta!r}")

    def hyper(self):
        """The hyper-parameters of nsa_torch.nsa_attention."""
        return dict(block_size=self.block_size, block_stride=self.block_stride,
                    select_size=self.select_size, num_selected=self.num_selected,
                    num_initial=self.num_initial, num_local=self.num_local,
                    window_size=self.window_size)


def _windows(x, block_size, block_stride, starts):
    """The compression windows of x [B, T, H, C]: [B, Nc, H, block_size, C]. starts (int64 [Nc],
    the first token of each window, packed x with B = 1) or None (fixed length)."""
    if starts is None:
        if x.shape[1] < block_size:
            return x.new_zeros(x.shape[0], 0, x.shape[2], block_size, x.shape[3])
        return x.unfold(1, block_size, block_stride).permute(0, 1, 2, 4, 3)
    idx = starts[:, None] + torch.arange(block_size, device=x.device)
    return x[0, idx].permute(0, 2, 1, 3).unsqueeze(0)


class BlockCompression(nn.Module):
    """phi: one compressed row per window of `block_size` rows (stride `block_stride`) of
    x [B, T, H, C] -> [B, Nc, H, C], the same map for every head.

    - "mlp" (the paper's): mean(window) + W2 silu(W1 flatten(window + pos)), with a learned
      intra-block position embedding pos [block_size, C], W1: block_size * C -> C, W2: C -> C.
      W2 starts at zero, so phi starts as mean pooling.
    - "linear": W flatten(window), W: block_size * C -> C, initialised to mean pooling.
    - "mean": mean pooling, no parameters.
    """

    def __init__(self, channels, block_size, block_stride, kind="mlp"):
        super().__init__()
        if kind not in _COMPRESSIONS:
            raise ValueError(f"nsa_torch.BlockCompression: kind must be one of {_COMPRESSIONS}, "
                             f"got {kind!r}")
        self.kind, self.block_size, self.block_stride = kind, block_size, block_stride
        if kind == "mlp":
            self.pos = nn.Parameter(torch.zeros(block_size, channels))
            self.fc1 = nn.Linear(block_size * channels, channels)
            self.fc2 = nn.Linear(channels, channels)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        elif kind == "linear":
            self.proj = nn.Linear(block_size * channels, channels, bias=False)
            with torch.no_grad():
                eye = torch.eye(channels) / block_size
                self.proj.weight.copy_(eye.repeat(1, block_size))

    def forward(self, x, starts=None):
        return self.compress_windows(_windows(x, self.block_size, self.block_stride, starts))

    def compress_windows(self, w):
        """phi of the windows w [..., H, block_size, C] -> [..., H, C]: the training forward's
        and the decoding step's (which compresses the windows its new tokens complete)."""
        if self.kind == "mean":
            return w.mean(-2)
        if self.kind == "linear":
            return self.proj(w.flatten(-2))
        h = F.silu(self.fc1((w + self.pos.to(w.dtype)).flatten(-2)))
        return w.mean(-2) + self.fc2(h)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _inv_freq(D, theta, dtype, device):
    """The rotary inverse frequencies [D / 2] for x of `dtype`, in the angles' precision
    (float64 for float64, else float32)."""
    f = torch.float64 if dtype == torch.float64 else torch.float32
    return 1.0 / (theta ** (torch.arange(0, D, 2, device=device, dtype=f) / D))


def _rotate(x, ang):
    """x rotated by the angles ang (x's shape or broadcast to it; both halves of the last dim
    the same angles)."""
    return x * ang.cos().to(x.dtype) + _rotate_half(x) * ang.sin().to(x.dtype)


def _rope(x, pos, theta):
    """Rotary embedding of x [B, N, heads, D] at positions pos [B, N] (rotate-half convention)."""
    inv_freq = _inv_freq(x.shape[-1], theta, x.dtype, x.device)
    ang = pos.to(inv_freq.dtype)[..., None] * inv_freq  # [B, N, D / 2]
    return _rotate(x, torch.cat((ang, ang), dim=-1)[:, :, None, :])


def _rope_step(constants, parts, pos, theta):
    """The rotary embedding of a decoding step's tensors at once: parts [(x, first)], x
    [B, n, heads, D] whose token j sits at position pos[:, first + j] (pos [B or 1, N]).
    Returns the rotated tensors, views of one [B, rows, D]: one set of angles, one cos and one
    sin for the queries and every key, with the row map and the inverse frequencies from
    `constants` (a DeviceConstants, made once). The same values as _rope of each."""
    x0 = parts[0][0]
    B, D, dev = x0.shape[0], x0.shape[-1], x0.device
    shapes = tuple((first,) + tuple(x.shape[1:3]) for x, first in parts)
    rows = constants.get(("rope rows", shapes), lambda: torch.cat([
        (first + torch.arange(n, device=dev)).repeat_interleave(heads)
        for first, n, heads in shapes]))
    inv_freq = constants.get(("rope", D, theta, x0.dtype),
                             lambda: _inv_freq(D, theta, x0.dtype, dev).repeat(2))
    pos = pos[:, rows]
    if pos.is_floating_point():
        pos = pos.to(inv_freq.dtype)
    # (integer positions times float frequencies: converted as .to(float) would, then multiplied)
    y = _rotate(torch.cat([x.reshape(B, -1, D) for x, _ in parts], 1), pos[..., None] * inv_freq)
    out, a = [], 0
    for x, _ in parts:
        n = x.shape[1] * x.shape[2]
        out.append(y[:, a:a + n].view(x.shape))
        a += n
    return out


def _packed_positions(cu_seqlens, total):
    """Token positions within their sequence for a packed batch: int64 [1, total] (once per
    cu_seqlens tensor)."""
    return _once_per_tensor(cu_seqlens, ("positions", total), lambda t: _packed_positions_now(t, total))


def _packed_positions_now(cu_seqlens, total):
    tok = torch.arange(total, device=cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    # (the sequence of each token: the count of starts at or before it, less one. Not
    # searchsorted(cu[1:], ...): inductor in torch 2.11 cannot lower it on a slice, SliceView)
    seq = torch.searchsorted(cu, tok, right=True) - 1
    return (tok - cu[seq])[None]


# What the layers of a model derive from the tensors that every layer receives (cu_seqlens; in
# the Hugging Face integration the mask and position_ids): without it each layer derives the same
# again, and a read of a device tensor waits for the device at every layer. Keyed by the tensor
# object (weakly: gone with it) and its version (derived again after an in-place change).
_DERIVED = WeakIdKeyDictionary()


def _once_per_tensor(t, key, derive):
    """derive(t), computed once for the tensor t and `key` (what else derive depends on) while t
    lives unchanged; every call under torch.compile (which traces it instead) and for inference
    tensors (they keep no version). derive must not return t itself (the entry would keep its
    key alive)."""
    if torch.compiler.is_compiling() or t.is_inference():
        return derive(t)
    found = _DERIVED.get(t)
    if found is None or found[0] != t._version:
        found = (t._version, {})
        _DERIVED[t] = found
    if key not in found[1]:
        found[1][key] = derive(t)
    return found[1][key]


def _to_device_async(t, device):
    """A host tensor copied to `device` without the host waiting: from pinned memory on CUDA (a
    copy from pageable memory may wait for the device's queue to drain first)."""
    if t.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling():
        t = t.pin_memory()  # (itself when it is pinned already)
    return t.to(device, non_blocking=True)


_float32_cuda_warned = False


def _attention_dtype(dtype, device):
    """The dtype the layer's attention runs in: its projections' dtype, except float32 on CUDA,
    where no kernel runs: bfloat16 then, with a warning once per process (as Hugging Face's
    flash-attention integration does)."""
    global _float32_cuda_warned
    if dtype != torch.float32 or device.type != "cuda":
        return dtype
    if not _float32_cuda_warned:
        _float32_cuda_warned = True
        warnings.warn("nsa_torch.NativeSparseAttention: float32 on CUDA, where the NSA kernels take "
                      "bfloat16 or float16: the attention runs in bfloat16 and its output is cast "
                      "back to float32. To avoid the casts, run the model under "
                      "torch.autocast('cuda', dtype=torch.bfloat16) or keep its weights in "
                      "bfloat16.", stacklevel=2)
    return torch.bfloat16


def _check_packed(where, x, cu_seqlens):
    """Checks a packed batch (x [1, total, hidden], cu_seqlens int32 [N + 1] from 0, never
    decreasing, to total, on the CPU or on x's device) and returns (cu_seqlens as a host list,
    cu_seqlens on x's device), once per cu_seqlens tensor for all the layers of a forward. The
    layers need the lengths on the host to shape their work: a cu_seqlens on the CPU gives them
    without waiting for the device, which one on the device costs once per forward."""
    cu = _once_per_tensor(cu_seqlens, (where, tuple(x.shape[:2]), x.device),
                          lambda t: _check_packed_now(where, x, t))
    if cu_seqlens.device == x.device:  # (not kept under its own key: it would never be freed)
        return cu, cu_seqlens
    return cu, _once_per_tensor(cu_seqlens, x.device, lambda t: _to_device_async(t, x.device))


def _check_packed_now(where, x, cu_seqlens):
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{where}: cu_seqlens must be int32 [N + 1], got "
                         f"{cu_seqlens.dtype} {list(cu_seqlens.shape)}")
    if cu_seqlens.device.type != "cpu" and cu_seqlens.device != x.device:
        raise ValueError(f"{where}: cu_seqlens must be on the CPU or on hidden_states' device "
                         f"{x.device}, got {cu_seqlens.device}")
    if x.shape[0] != 1:
        raise ValueError(f"{where}: with cu_seqlens, hidden_states must be a packed batch "
                         f"[1, total, hidden_size], got B = {x.shape[0]}")
    cu = cu_seqlens.tolist()
    if not cu or cu[0] != 0 or cu[-1] != x.shape[1] or any(b < a for a, b in zip(cu, cu[1:])):
        shown = cu if len(cu) <= 12 else cu[:6] + ["..."] + cu[-3:]
        raise ValueError(f"{where}: cu_seqlens must start at 0, never decrease and end at the "
                         f"packed token count {x.shape[1]}, got {shown}")
    return cu


class NativeSparseAttention(nn.Module):
    """Native Sparse Attention layer (Yuan et al. 2025): x [B, T, hidden_size] -> [B, T, hidden_size].

    Args: hidden_size, num_heads (query heads HQ), num_kv_heads (H, dividing HQ), head_dim (D),
    v_head_dim (Dv, default D); the NSA hyper-parameters of nsa_torch.nsa_attention;
    compression ("mlp", the paper's; "mean"; "linear"; see BlockCompression), separate for K and
    V; rope_theta; separate_branch_kv (each branch its own K/V projections, as the paper
    describes; else the three share k_proj/v_proj); bias (of the q/k/v/o projections; the gate
    projection always has one, initialised to zero: every gate starts at 0.5).

    forward(hidden_states, cu_seqlens=None, position_ids=None): with cu_seqlens (int32 [N + 1])
    hidden_states is a packed batch [1, total, hidden_size] and positions restart at 0 in each
    sequence; cu_seqlens may be on the CPU, which spares each layer a wait for the device (the
    layer needs the lengths on the host), or on hidden_states' device; position_ids [B, T]
    overrides the positions (for the rotary embeddings and the compressed keys' positions). The
    attention runs in the projections' dtype (e.g. bfloat16 under torch.autocast); float32 on
    CUDA, which the kernels do not take, runs it in bfloat16 (with a warning, once) and returns
    float32.

    forward(..., cache=NSACache) decodes, without autograd (docs/design.md, section 7). An empty
    cache is prefilled: the forward above runs (batched [B, T], B = the cache's batch size, or
    packed with cu_seqlens, sequence s into row s) and its K/V and compressed tokens fill the
    cache. A non-empty cache takes hidden_states [B, S, hidden] as the next S >= 1 tokens of
    every sequence (a decoding step, or a chunk of a prompt), at positions seqlens + 0 .. S-1
    (position_ids [B, S] may override the rotary positions); the output rows equal the forward's
    rows at those positions over the whole sequence. A step has fixed shapes and no host sync:
    it can be captured in a CUDA graph.
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim=None, *,
                 block_size=32, block_stride=16, select_size=64, num_selected=16, num_initial=1,
                 num_local=2, window_size=512, compression="mlp", rope_theta=10000.0,
                 separate_branch_kv=False, bias=False):
        super().__init__()
        cfg = NSAConfig(hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim,
                        block_size=block_size, block_stride=block_stride, select_size=select_size,
                        num_selected=num_selected, num_initial=num_initial, num_local=num_local,
                        window_size=window_size, compression=compression, rope_theta=rope_theta,
                        separate_branch_kv=separate_branch_kv, bias=bias)
        self.config = cfg
        HQ, H, D, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.v_head_dim
        self.q_proj = nn.Linear(hidden_size, HQ * D, bias=bias)
        for suffix in self.kv_suffixes():
            setattr(self, "k_proj" + suffix, nn.Linear(hidden_size, H * D, bias=bias))
            setattr(self, "v_proj" + suffix, nn.Linear(hidden_size, H * Dv, bias=bias))
        self.k_compress = BlockCompression(D, block_size, block_stride, compression)
        self.v_compress = BlockCompression(Dv, block_size, block_stride, compression)
        self.g_proj = nn.Linear(hidden_size, 3 * HQ, bias=True)
        nn.init.zeros_(self.g_proj.bias)
        self.o_proj = nn.Linear(HQ * Dv, hidden_size, bias=bias)

    def kv_suffixes(self):
        """Suffixes of the K/V projections' names: k_proj, v_proj, or with separate_branch_kv
        k_proj_cmp, k_proj_slc, k_proj_swa and the v_proj_* twins."""
        return ("_cmp", "_slc", "_swa") if self.config.separate_branch_kv else ("",)

    @classmethod
    def from_config(cls, config: NSAConfig):
        kw = asdict(config)
        args = [kw.pop(n) for n in ("hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                    "v_head_dim")]
        return cls(*args, **kw)

    def extra_repr(self):
        c = self.config
        return (f"HQ={c.num_heads}, H={c.num_kv_heads}, D={c.head_dim}, Dv={c.v_head_dim}, "
                f"l={c.block_size}, d={c.block_stride}, l'={c.select_size}, n={c.num_selected}, "
                f"w={c.window_size}, compression={c.compression!r}, "
                f"separate_branch_kv={c.separate_branch_kv}")

    def _check(self, x, cu_seqlens, position_ids):
        """Raises on bad input; returns cu_seqlens as (a host list, a tensor on x's device), or
        (None, None) when not packed."""
        where = "nsa_torch.NativeSparseAttention"
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"{where}: hidden_states must be [B, T, hidden_size = "
                             f"{c.hidden_size}], got {list(x.shape)}")
        if position_ids is not None and tuple(position_ids.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{where}: position_ids must be [B, T] = {list(x.shape[:2])}, got "
                             f"{list(position_ids.shape)}")
        return (None, None) if cu_seqlens is None else _check_packed(where, x, cu_seqlens)

    def _window_starts(self, cu, device):
        """First token of every compression window of a packed batch (int64 [Nc_total]), in the
        order of the packed k_cmp rows, from the host list cu (cu_seqlens); built on the host and
        copied once (a loop of per-sequence aranges costs a launch per sequence)."""
        c = self.config
        cu = torch.tensor(cu, dtype=torch.int64)
        n = cu.diff()
        nc = torch.where(n >= c.block_size, (n - c.block_size).div(c.block_stride, rounding_mode="floor") + 1, 0)
        first = (nc.cumsum(0) - nc).repeat_interleave(nc)  # each window's sequence's first k_cmp row
        local = torch.arange(int(nc.sum())) - first       # window index within its sequence
        return _to_device_async(cu[:-1].repeat_interleave(nc) + local * c.block_stride, device)

    def forward(self, hidden_states, cu_seqlens=None, position_ids=None, cache=None):
        if cache is not None:
            return self._forward_cached(hidden_states, cu_seqlens, position_ids, cache)
        cu, cu_seqlens = self._check(hidden_states, cu_seqlens, position_ids)
        p = self._project(hidden_states, cu, cu_seqlens, position_ids)
        return self._output(self._attend(p, cu_seqlens), p.q.dtype)

    def _kv(self, x, suffix, dtype):
        """The un-rotated keys and values of one K/V projection: [B, T, H, D], [B, T, H, Dv]."""
        c = self.config
        B, T, _ = x.shape
        k = getattr(self, "k_proj" + suffix)(x).view(B, T, c.num_kv_heads, c.head_dim).to(dtype)
        v = getattr(self, "v_proj" + suffix)(x).view(B, T, c.num_kv_heads, c.v_head_dim).to(dtype)
        return k, v

    def _gates(self, x, dtype):
        """g_cmp, g_slc, g_swa: [B, T, HQ] each."""
        B, T, _ = x.shape
        return torch.sigmoid(self.g_proj(x)).to(dtype).view(B, T, 3, self.config.num_heads).unbind(2)

    def _project(self, x, cu, cu_seqlens, position_ids):
        """Everything the attention of the training forward takes, in the projections' dtype:
        _Projected (rotated q, the compressed branch's un-rotated k_c / v_c, the compressed
        k_cmp (rotated) / v_cmp, the gates, and `raw`: the rotated keys and values of the
        selected branch, then of the window branch with separate_branch_kv)."""
        c = self.config
        B, T, _ = x.shape
        HQ, D = c.num_heads, c.head_dim
        if position_ids is None:
            if cu_seqlens is None:
                position_ids = torch.arange(T, device=x.device)[None].expand(B, T)
            else:
                position_ids = _packed_positions(cu_seqlens, T)
        # (cu_seqlens on x's device is one tensor for all the layers of a forward: _check_packed)
        starts = None if cu is None else _once_per_tensor(
            cu_seqlens, ("window starts", c.block_size, c.block_stride), lambda _: self._window_starts(cu, x.device))

        q = self.q_proj(x).view(B, T, HQ, D)
        dtype = q.dtype
        k_c, v_c = self._kv(x, "_cmp" if c.separate_branch_kv else "", dtype)
        k_cmp = self.k_compress(k_c, starts).to(dtype)
        v_cmp = self.v_compress(v_c, starts).to(dtype).contiguous()
        # Positions of the compressed keys: the last token of their window.
        if starts is None:
            nc = k_cmp.shape[1]
            ends = torch.arange(nc, device=x.device) * c.block_stride + (c.block_size - 1)
            pos_cmp = position_ids[:, ends]
        else:
            pos_cmp = position_ids[:, starts + (c.block_size - 1)]
        k_cmp = _rope(k_cmp, pos_cmp, c.rope_theta).contiguous()
        q = _rope(q, position_ids, c.rope_theta).contiguous()
        if not c.separate_branch_kv:
            raw = (_rope(k_c, position_ids, c.rope_theta).contiguous(), v_c.contiguous())
        else:
            raw = ()
            for suffix in ("_slc", "_swa"):
                k, v = self._kv(x, suffix, dtype)
                raw += (_rope(k, position_ids, c.rope_theta).contiguous(), v.contiguous())
        return _Projected(q, k_c, v_c, k_cmp, v_cmp, self._gates(x, dtype), raw)

    def _attend(self, p, cu_seqlens):
        """The training forward's attention: [B, T, HQ, Dv] in the attention's dtype."""
        c = self.config
        # The attention's inputs are cast last (a no-op but for float32 on CUDA): the rotary
        # embedding and the compression run in the projections' dtype.
        attn = _attention_dtype(p.q.dtype, p.q.device)
        q, k_cmp, v_cmp, g_cmp, g_slc, g_swa = (t.to(attn) for t in (p.q, p.k_cmp, p.v_cmp) + p.gates)
        raw = [t.to(attn) for t in p.raw]
        if not c.separate_branch_kv:
            return nsa_fn.nsa_attention(q, *raw, k_cmp, v_cmp, g_cmp, g_slc, g_swa,
                                        cu_seqlens=cu_seqlens, **c.hyper())
        common = dict(cu_seqlens=cu_seqlens)
        o_cmp, lse = nsa_fn.compressed_attention(q, k_cmp, v_cmp, block_size=c.block_size,
                                                 block_stride=c.block_stride, **common)
        idx = nsa_fn.select_blocks(q, k_cmp, lse, block_size=c.block_size,
                                   block_stride=c.block_stride, select_size=c.select_size,
                                   num_selected=c.num_selected, num_initial=c.num_initial,
                                   num_local=c.num_local, **common)
        k_s, v_s, k_w, v_w = raw
        o_slc = nsa_fn.selected_attention(q, k_s, v_s, idx, select_size=c.select_size, **common)
        o_swa = nsa_fn.sliding_window_attention(q, k_w, v_w, window_size=c.window_size, **common)
        return nsa_fn.gated_sum(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)

    def _output(self, o, dtype):
        B, T, HQ, Dv = o.shape
        return self.o_proj(o.to(dtype).reshape(B, T, HQ * Dv))

    # ---------------------------------------------------------------------------- decoding
    def _forward_cached(self, x, cu_seqlens, position_ids, cache):
        """forward with an NSACache: prefill when it is empty, else append S tokens to each of
        its sequences (docs/design.md, "Decoding")."""
        where = "nsa_torch.NativeSparseAttention"
        if not isinstance(cache, NSACache):
            raise TypeError(f"{where}: cache must be an nsa_torch.NSACache, got "
                            f"{type(cache).__name__}")
        cu, cu_dev = self._check(x, cu_seqlens, position_ids)
        if x.shape[1] == 0:
            raise ValueError(f"{where}: with a cache, hidden_states must hold at least one token, "
                             f"got {list(x.shape)}")
        # Only host values here: every check comes before the first write.
        cache.check_layer(where, self.config, x.device)
        prefill = not any(cache.lengths)
        if cu is not None:
            if not prefill:
                raise ValueError(f"{where}: cu_seqlens (a packed prompt) needs an empty cache, got "
                                 f"one holding {cache.lengths} tokens; pass the next tokens of "
                                 f"every sequence as hidden_states [B = {cache.batch_size}, S, "
                                 f"hidden_size] without cu_seqlens")
            new = [e - s for s, e in zip(cu, cu[1:])]
            if len(new) != cache.batch_size:
                raise ValueError(f"{where}: cu_seqlens holds {len(new)} sequences, the cache "
                                 f"{cache.batch_size} (sequence s of the pack fills batch row s)")
        else:
            if x.shape[0] != cache.batch_size:
                raise ValueError(f"{where}: hidden_states holds B = {x.shape[0]} sequences, the "
                                 f"cache {cache.batch_size}")
            new = [x.shape[1]] * x.shape[0]
        cache.check_room(where, new)
        with torch.no_grad():
            if prefill:
                return self._prefill(x, cu, cu_dev, position_ids, cache, new, where)
            return self._extend(x, position_ids, cache, where)

    def _prefill(self, x, cu, cu_dev, position_ids, cache, lengths, where):
        """The training forward, whose K/V, compressed tokens and last block_size compression
        inputs then fill the empty cache (packed sequence s into row s)."""
        p = self._project(x, cu, cu_dev, position_ids)
        cache.check_layer(where, self.config, x.device, _attention_dtype(p.q.dtype, x.device))
        y = self._output(self._attend(p, cu_dev), p.q.dtype)
        B, T, _ = x.shape
        dev, l = x.device, self.config.block_size
        if cu is None:
            b = torch.arange(B, device=dev)[:, None].expand(B, T)
            t = torch.arange(T, device=dev)[None].expand(B, T)
            cache.write_raw(b, t, p.raw)
            nc = p.k_cmp.shape[1]
            cache.write_cmp(b[:, :nc], t[:, :nc], p.k_cmp, p.v_cmp)
            m = min(T, l)
            cache.write_ring(b[:, T - m:], t[:, T - m:] % l, p.k_c[:, T - m:], p.v_c[:, T - m:])
        else:
            # Index tensors built on the host (the lengths are there), copied once each.
            n = torch.tensor(lengths)
            seq = torch.repeat_interleave(torch.arange(len(lengths)), n)
            pos = torch.arange(T) - torch.repeat_interleave(torch.tensor(cu[:-1]), n)
            nc = torch.tensor([num_cmp_tokens(L, l, self.config.block_stride) for L in lengths])
            seq_c = torch.repeat_interleave(torch.arange(len(lengths)), nc)
            row_c = torch.arange(int(nc.sum())) - torch.repeat_interleave(nc.cumsum(0) - nc, nc)
            last = (pos >= n[seq] - l).nonzero()[:, 0]  # each sequence's last block_size tokens
            seq, pos, seq_c, row_c, last = (_to_device_async(t, dev)
                                            for t in (seq, pos, seq_c, row_c, last))
            cache.write_raw(seq, pos, [r[0] for r in p.raw])
            cache.write_cmp(seq_c, row_c, p.k_cmp[0], p.v_cmp[0])
            cache.write_ring(seq[last], pos[last] % l, p.k_c[0, last], p.v_c[0, last])
        cache.seqlens.copy_(_to_device_async(torch.tensor(lengths, dtype=torch.int32), dev))
        cache.lengths = list(lengths)
        return y

    def _extend(self, x, position_ids, cache, where):
        """One decoding step (or a chunk of a prompt): x [B, S, hidden] are the next S tokens of
        every sequence. Device work of fixed shapes only, no host read: a CUDA graph can
        capture it. Every index, arange and frequency comes from the cache's constants."""
        c = self.config
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, c.num_heads, c.head_dim)
        dtype = q.dtype
        attn = _attention_dtype(dtype, x.device)
        cache.check_layer(where, c, x.device, attn)
        idx = cache.step_index(S)
        k_c, v_c = self._kv(x, "_cmp" if c.separate_branch_kv else "", dtype)
        # The compressed tokens whose window the new tokens complete: phi as in training on the
        # un-rotated inputs (the candidates that complete none go to the scratch row).
        wk, wv = cache.new_windows(idx, k_c, v_c)
        k_new = self.k_compress.compress_windows(wk.to(dtype)).to(dtype)
        v_new = self.v_compress.compress_windows(wv.to(dtype)).to(dtype)
        kv = [(k_c, v_c)] if not c.separate_branch_kv else [self._kv(x, suffix, dtype)
                                                            for suffix in ("_slc", "_swa")]
        # One rotation: the queries and raw keys at their positions, each compressed key at its
        # window's last token.
        pos = idx.pos if position_ids is None else position_ids.gather(1, idx.tok)
        q, *keys, k_new = _rope_step(cache.constants, [(q, 0)] + [(k, 0) for k, _ in kv]
                                     + [(k_new, S)], pos, c.rope_theta)
        raw = [t for k, (_, v) in zip(keys, kv) for t in (k, v)]
        cache.append(idx, raw, k_new, v_new, k_c, v_c)
        g_cmp, g_slc, g_swa = (g.to(attn) for g in self._gates(x, dtype))
        o = nsa_fn.decode_attention(q.to(attn), cache.k, cache.v, cache.k_cmp, cache.v_cmp, g_cmp,
                                    g_slc, g_swa, cache.seqlens, block_table=cache.block_table,
                                    k_swa_cache=cache.k_swa, v_swa_cache=cache.v_swa,
                                    **c.hyper())
        return self._output(o, dtype)


class _Projected(NamedTuple):
    """What NativeSparseAttention._project returns (see there)."""

    q: torch.Tensor
    k_c: torch.Tensor
    v_c: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    gates: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    raw: Tuple[torch.Tensor, ...]


class StaticKVCache:
    """The decoding state of one FullAttention layer (the dense baseline) for B sequences of one
    length: rotated keys k [B, capacity, H, D] and values v [B, capacity, H, Dv], allocated once,
    of which the first `length` tokens are filled.

        cache = StaticKVCache.for_layer(layer, batch_size=B, capacity=T + new, dtype=torch.bfloat16)
        layer(prompt, cache=cache)      # prefill: causal attention over the prompt, fills the cache
        layer(x_next, cache=cache)      # decode: x_next's S tokens attend the cached prefix

    dtype is the dtype the attention runs in (the projections', e.g. bfloat16 under autocast).
    The length lives twice: `seqlen` (int64 [], on the device) is what a decoding step reads, so
    that the step has fixed shapes and never waits for the host (as a static cache under
    torch.compile: it attends the whole capacity under a mask) and a CUDA graph can capture it;
    `length` (a host int) is only for checks. A replayed graph advances seqlen alone: call
    sync_lengths() before the next eager call.
    """

    def __init__(self, batch_size, capacity, num_kv_heads, head_dim, v_head_dim=None, *,
                 device=None, dtype=None):
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        kw = dict(device=device, dtype=dtype)
        # (zeros: a step reads the unfilled rows too, masked, and a NaN there would leak through)
        self.k = torch.zeros(batch_size, capacity, num_kv_heads, head_dim, **kw)
        self.v = torch.zeros(batch_size, capacity, num_kv_heads, v_head_dim, **kw)
        self.length = 0
        self.seqlen = torch.zeros((), dtype=torch.int64, device=self.k.device)
        self.constants = DeviceConstants()

    @classmethod
    def for_layer(cls, layer, batch_size, capacity, *, device=None, dtype=None):
        """A cache shaped for `layer` (a FullAttention), on its device and in its dtype unless
        given."""
        c, w = layer.config, layer.q_proj.weight
        return cls(batch_size, capacity, c.num_kv_heads, c.head_dim, c.v_head_dim,
                   device=w.device if device is None else device, dtype=dtype or w.dtype)

    @property
    def capacity(self):
        return self.k.shape[1]

    def _check(self, k, v):
        """Raises unless k [B, S, H, D], v [B, S, H, Dv] fit the cache and its room."""
        where = "nsa_torch.StaticKVCache"
        S = k.shape[1]
        if tuple(k.shape) != (self.k.shape[0], S) + tuple(self.k.shape[2:]) or \
                tuple(v.shape) != (self.v.shape[0], S) + tuple(self.v.shape[2:]):
            raise ValueError(f"{where}: the layer's keys {list(k.shape)} and values "
                             f"{list(v.shape)} do not fit the cache's [B, S, H, D|Dv] = "
                             f"{[self.k.shape[0], S] + list(self.k.shape[2:])} and "
                             f"{[self.v.shape[0], S] + list(self.v.shape[2:])}")
        if k.dtype != self.k.dtype or k.device != self.k.device:
            raise ValueError(f"{where}: the layer's keys are {k.dtype} on {k.device}, the cache "
                             f"{self.k.dtype} on {self.k.device}")
        if self.length + S > self.capacity:
            raise ValueError(f"{where}: {self.length} cached + {S} new tokens exceed the "
                             f"capacity {self.capacity}")

    def append(self, k, v):
        """Writes k [B, S, H, D], v [B, S, H, Dv] at positions length .. length + S - 1, slices at
        host offsets (the prefill's)."""
        self._check(k, v)
        end = self.length + k.shape[1]
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        self.length = end
        self.seqlen.fill_(end)

    def positions(self, S):
        """The positions of the next S tokens: int64 [S] on the device, from seqlen."""
        return self.seqlen + self.constants.get(("arange", S), lambda: torch.arange(
            S, device=self.k.device))

    def write(self, pos, k, v):
        """A decoding step's append: k, v [B, S, H, D|Dv] at positions pos (positions(S)), by
        fixed-shape index copies; then seqlen and length advance by S."""
        self._check(k, v)
        self.k.index_copy_(1, pos, k)
        self.v.index_copy_(1, pos, v)
        self.seqlen += k.shape[1]
        self.length += k.shape[1]

    def mask(self, pos, G=1):
        """bool [S * G, capacity] (S > 1) or [1, capacity]: row (s, g), query s at position
        pos[s], sees the cached tokens up to it."""
        S, cap = pos.shape[0], self.capacity
        if S > 1 and G > 1:
            pos = pos[:, None].expand(S, G).reshape(S * G)
        return self.constants.get(("arange", cap), lambda: torch.arange(
            cap, device=self.k.device)) <= pos[:, None]

    def sync_lengths(self):
        """Reads seqlen back into the host `length` (waits for the device), after replaying a
        captured step."""
        self.length = int(self.seqlen)


class FullAttention(nn.Module):
    """Full causal attention (torch's scaled_dot_product_attention) between NativeSparseAttention's
    q/k/v/o projections and rotary embedding: the dense baseline that a model or a layer is
    compared against. `FullAttention.twin_of(nsa_layer)` shares (does not copy) an NSA layer's
    projections.

    forward(hidden_states, cu_seqlens=None, position_ids=None, cache=None) as
    NativeSparseAttention's; a packed batch runs one SDPA call per run of consecutive sequences of
    equal length (pack sequences of one length together). cache: a StaticKVCache (no autograd);
    empty, the forward fills it; filled, hidden_states' S tokens follow the cached ones
    (positions from there) and attend them (decoding: the whole capacity under a length mask,
    a fixed-shape step). backends: SDPA backends to allow (torch.nn.attention.sdpa_kernel;
    None: torch chooses; decoding steps need one that takes a mask); gqa: True passes
    enable_gqa to SDPA, False repeats K/V to every query head (for backends that refuse
    enable_gqa; decoding steps need neither).
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim=None, *,
                 rope_theta=10000.0, bias=False, backends=None, gqa=True):
        super().__init__()
        self.config = NSAConfig(hidden_size, num_heads, num_kv_heads, head_dim, v_head_dim,
                                rope_theta=rope_theta, bias=bias)
        c = self.config
        self.q_proj = nn.Linear(hidden_size, c.num_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, c.num_kv_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, c.num_kv_heads * c.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, hidden_size, bias=bias)
        self.backends, self.gqa = backends, gqa

    @classmethod
    def twin_of(cls, layer, backends=None, gqa=True):
        """A FullAttention on `layer`'s own q/k/v/o projections (a NativeSparseAttention whose
        branches share K/V)."""
        c = layer.config
        if c.separate_branch_kv:
            raise ValueError("nsa_torch.FullAttention.twin_of: the layer has one K/V projection "
                             "per branch (separate_branch_kv=True); full attention has one")
        with torch.device("meta"):  # the projections are replaced by the layer's
            twin = cls(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim,
                       rope_theta=c.rope_theta, bias=c.bias, backends=backends, gqa=gqa)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(twin, name, getattr(layer, name))
        return twin

    def forward(self, hidden_states, cu_seqlens=None, position_ids=None, cache=None):
        if cache is not None and torch.is_grad_enabled():  # decoding is inference
            with torch.no_grad():
                return self.forward(hidden_states, cu_seqlens, position_ids, cache)
        where = "nsa_torch.FullAttention"
        c = self.config
        x = hidden_states
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"{where}: hidden_states must be [B, T, hidden_size = "
                             f"{c.hidden_size}], got {list(x.shape)}")
        B, T, _ = x.shape
        if position_ids is not None and tuple(position_ids.shape) != (B, T):
            raise ValueError(f"{where}: position_ids must be [B, T] = {[B, T]}, got "
                             f"{list(position_ids.shape)}")
        if cache is not None and cu_seqlens is not None:
            raise ValueError(f"{where}: a cache holds a batch [B, T, hidden_size], not a packed "
                             f"one (cu_seqlens)")
        if cache is not None and cache.length > 0:
            return self._decode(x, position_ids, cache)
        cu, cu_seqlens = (None, None) if cu_seqlens is None else _check_packed(where, x, cu_seqlens)
        if position_ids is None:
            position_ids = (torch.arange(T, device=x.device)[None].expand(B, T)
                            if cu is None else _packed_positions(cu_seqlens, T))
        HQ, H, D, Dv = c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim
        q = _rope(self.q_proj(x).view(B, T, HQ, D), position_ids, c.rope_theta)
        k = _rope(self.k_proj(x).view(B, T, H, D), position_ids, c.rope_theta)
        v = self.v_proj(x).view(B, T, H, Dv)
        if cache is not None:
            cache.append(k, v)
        if cu is None:
            o = self._attend(q, k, v)
        else:
            # A packed batch: each run of consecutive sequences of one length L is a [n, L]
            # batch of its own (one SDPA call per run, no T x T mask over the whole pack).
            parts, s = [], 0
            while s < len(cu) - 1:
                L, e = cu[s + 1] - cu[s], s + 1
                while e < len(cu) - 1 and cu[e + 1] - cu[e] == L:
                    e += 1
                if L > 0:
                    run = slice(cu[s], cu[e])
                    parts.append(self._attend(*(t[:, run].reshape(e - s, L, *t.shape[2:]) for t in (q, k, v)))
                                 .reshape(1, (e - s) * L, HQ, Dv))
                s = e
            o = torch.cat(parts, 1) if parts else q.new_zeros(1, 0, HQ, Dv)
        return self.o_proj(o.reshape(B, T, HQ * Dv))

    def _attend(self, q, k, v):
        """Causal SDPA of q [B, T, HQ, D], k [B, T, H, D], v [B, T, H, Dv] -> [B, T, HQ, Dv]."""
        HQ, H = q.shape[2], k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        extra = {}
        if HQ != H:
            if self.gqa:
                extra = dict(enable_gqa=True)
            else:
                k, v = k.repeat_interleave(HQ // H, 1), v.repeat_interleave(HQ // H, 1)
        return self._sdpa(q, k, v, is_causal=True, **extra).transpose(1, 2)

    def _decode(self, x, position_ids, cache):
        """A decoding step: x [B, S, hidden] follows the cached tokens. Fixed shapes, no host
        read (a CUDA graph can capture it): positions from the cache's device-side length, K/V
        written by index, and the queries attend the whole capacity under a length mask, as a
        static KV cache does under torch.compile. The G query heads of a KV head are rows of one
        [S * G, capacity] problem: no K/V repeated, no enable_gqa."""
        c = self.config
        B, S, _ = x.shape
        HQ, H, D, Dv = c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim
        G = HQ // H
        pos = cache.positions(S)
        q = self.q_proj(x).view(B, S, HQ, D)
        k = self.k_proj(x).view(B, S, H, D)
        q, k = _rope_step(cache.constants, [(q, 0), (k, 0)],
                          pos[None] if position_ids is None else position_ids, c.rope_theta)
        cache.write(pos, k, self.v_proj(x).view(B, S, H, Dv))
        mask = cache.mask(pos, G)
        q = q.view(B, S, H, G, D).permute(0, 2, 1, 3, 4).reshape(B, H, S * G, D)
        o = self._sdpa(q, cache.k.transpose(1, 2), cache.v.transpose(1, 2), attn_mask=mask)
        o = o.view(B, H, S, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, S, HQ * Dv)
        return self.o_proj(o)

    def _sdpa(self, q, k, v, **kw):
        if not self.backends:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(self.backends):
            return F.scaled_dot_product_attention(q, k, v, **kw)
