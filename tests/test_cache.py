"""Decoding with nsa_torch.NSACache through NativeSparseAttention (docs/design.md, "Decoding").

Teacher forcing: prefill x[:, :t0], then feed the rest token by token or in chunks; every
decoded row must equal the training forward's row (float64 on CPU to 1e-9) and choose the same
blocks. Over both cache layouts (contiguous, paged with shuffled block tables), the three
compressions, separate_branch_kv, G = 1 and 4, D != Dv, prompts shorter than a compression
window, lengths crossing compression-window and selection-block edges, windows smaller than the
sequence, packed prompts of different lengths decoded together. Then the serving helpers
(block tables, pools, reset), every bad input, bf16, and on CUDA bf16 against float64 CPU and
the capture of a step in a CUDA graph. A step's cost: the ops it dispatches (bounded, with
nothing recomputed per step) and their shapes, the same at every length.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nsa_torch
from nsa_torch import NSACache, reference
from nsa_torch import functional as nsa_fn
from nsa_torch.cache import DeviceConstants
from nsa_torch.modules import FullAttention, StaticKVCache
from helpers import assert_close, cu_seqlens_of, rel_err

F64 = torch.float64
# Small enough for the reference, large enough that every branch matters within T ~ 140:
# compression windows of 32 every 16 tokens, selection blocks of 32, 3 selected (block 0, the
# current block and one free choice from t = 96 on), a window of 24.
HYPER = dict(block_size=32, block_stride=16, select_size=32, num_selected=3, num_initial=1,
             num_local=1, window_size=24)
HIDDEN = 24


def make_layer(compression="mlp", separate=False, G=4, H=1, D=8, Dv=6, dtype=F64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = nsa_torch.NativeSparseAttention(HIDDEN, G * H, H, D, Dv, compression=compression,
                                            separate_branch_kv=separate, **{**HYPER, **kw})
    with torch.no_grad():  # every path live (the MLP's second layer and the gate bias start at 0)
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)))
    return layer.to(dtype)


def shuffled_paged(layer, B, capacity, page_size=32, spare=3, seed=1, **kw):
    """A paged cache whose block table gives each sequence random pages of a larger pool."""
    max_pages = -(-capacity // page_size)
    num_pages = B * max_pages + spare
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(num_pages, generator=gen)[:B * max_pages].view(B, max_pages)
    device = next(layer.parameters()).device
    return NSACache.paged(layer, B, page_size=page_size, max_pages=max_pages, num_pages=num_pages,
                          block_table=table.to(device, torch.int32), **kw)


def make_cache(layer, B, capacity, paged, **kw):
    return shuffled_paged(layer, B, capacity, **kw) if paged else NSACache(layer, B, capacity, **kw)


class Blocks:
    """Records the blocks each query chose: in the training forward (nsa_attention's, or
    select_blocks' with separate_branch_kv) and in every decoding step."""

    def __init__(self, monkeypatch):
        self.full, self.steps = [], []
        nsa, select, decode = nsa_fn.nsa_attention, nsa_fn.select_blocks, nsa_fn.decode_attention

        def nsa_recorded(*args, **kw):
            o, idx = nsa(*args, **kw, return_block_indices=True)
            self.full.append(idx)
            return o

        def select_recorded(*args, **kw):
            idx = select(*args, **kw)
            self.full.append(idx)
            return idx

        def decode_recorded(*args, **kw):
            o, idx = decode(*args, **kw, return_block_indices=True)
            self.steps.append(idx)
            return o
        monkeypatch.setattr(nsa_fn, "nsa_attention", nsa_recorded)
        monkeypatch.setattr(nsa_fn, "select_blocks", select_recorded)
        monkeypatch.setattr(nsa_fn, "decode_attention", decode_recorded)


def teacher_forcing(layer, x, t0, chunk, cache, blocks=None, bound=1e-9):
    """Prefills x[:, :t0] into cache, feeds the rest `chunk` tokens at a time, and checks every
    output row against the training forward's (and, with `blocks`, the chosen blocks). Returns
    the training forward's output and the cached forward's, [B, T, hidden] each."""
    B, T, _ = x.shape
    with torch.no_grad():
        full = layer(x)
    full_idx = blocks.full[-1] if blocks else None
    y = layer(x[:, :t0], cache=cache)
    assert y.shape == (B, t0, HIDDEN)
    assert_close(y, full[:, :t0], bound, "prefill")
    ys = [y]
    assert cache.lengths == [t0] * B and cache.seqlens.tolist() == [t0] * B
    t = t0
    while t < T:
        S = min(chunk, T - t)
        y = layer(x[:, t:t + S], cache=cache)
        assert y.shape == (B, S, HIDDEN)
        assert_close(y, full[:, t:t + S], bound, f"tokens {t}..{t + S - 1}")
        if blocks:
            assert torch.equal(blocks.steps[-1], full_idx[:, t:t + S]), f"blocks of {t}..{t + S - 1}"
        ys.append(y)
        t += S
    assert cache.lengths == [T] * B and cache.seqlens.tolist() == [T] * B
    return full, torch.cat(ys, 1)


@pytest.mark.parametrize("G", [4, 1])
@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
@pytest.mark.parametrize("compression", ["mlp", "mean", "linear"])
def test_teacher_forcing(compression, separate, G, monkeypatch):
    """Token by token from a 33-token prompt to 140 (across compression windows every 16,
    selection blocks every 32, a window of 24), B = 2, D = 8 != Dv = 6."""
    layer = make_layer(compression, separate, G=G, H=2 if G == 1 else 1)
    x = torch.randn(2, 140, HIDDEN, dtype=F64)
    teacher_forcing(layer, x, 33, 1, NSACache(layer, 2, 150), Blocks(monkeypatch))


@pytest.mark.parametrize("t0,paged", [(1, False), (1, True), (5, True), (31, False), (32, True),
                                      (33, False), (70, True)])
def test_prompt_lengths(t0, paged, monkeypatch):
    """Prompts shorter than, equal to and just over a compression window, and longer than the
    sliding window; decoding to 120 tokens."""
    layer = make_layer(seed=t0)
    x = torch.randn(2, 120, HIDDEN, dtype=F64)
    teacher_forcing(layer, x, t0, 1, make_cache(layer, 2, 120, paged), Blocks(monkeypatch))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("chunk", [3, 7, 40])
def test_chunked(chunk, paged, monkeypatch):
    """Chunks of S tokens attend the cache and themselves (S = 40 > block_size: a chunk
    completes several compression windows and overwrites the whole ring)."""
    layer = make_layer("mlp", separate=paged, seed=chunk)
    x = torch.randn(2, 150, HIDDEN, dtype=F64)
    teacher_forcing(layer, x, 10, chunk, make_cache(layer, 2, 160, paged), Blocks(monkeypatch))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_packed_prefill_then_decode_together(paged, monkeypatch):
    """Sequences of different lengths (one empty: it starts at the first step) prefilled as one
    packed batch (sequence s into row s), then decoded together token by token and by chunks
    of 3: each row against its sequence's own training forward, with its blocks."""
    blocks = Blocks(monkeypatch)
    layer = make_layer("linear", separate=True, seed=3)
    lengths, steps = [37, 1, 0, 64, 90, 16], [1] * 20 + [3] * 6
    T = [n + sum(steps) for n in lengths]
    xs = [torch.randn(1, n, HIDDEN, dtype=F64) for n in T]
    full, full_idx = [], []
    for x in xs:
        with torch.no_grad():
            full.append(layer(x))
        full_idx.append(blocks.full[-1])
    cache = make_cache(layer, len(lengths), max(T), paged)
    cu = cu_seqlens_of(lengths)
    y = layer(torch.cat([x[:, :n] for x, n in zip(xs, lengths)], 1), cache=cache, cu_seqlens=cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        assert_close(y[:, a:b], full[s][:, :b - a], 1e-9, f"prefill of sequence {s}")
    assert cache.lengths == lengths and cache.seqlens.tolist() == lengths
    done = 0
    for S in steps:
        x = torch.cat([x[:, n + done:n + done + S] for x, n in zip(xs, lengths)], 0)
        y = layer(x, cache=cache)
        for s, n in enumerate(lengths):
            rows = slice(n + done, n + done + S)
            assert_close(y[s:s + 1], full[s][:, rows], 1e-9, f"sequence {s}, tokens {rows}")
            assert torch.equal(blocks.steps[-1][s], full_idx[s][0, rows]), f"blocks {s}, {rows}"
        done += S
    assert cache.lengths == T


@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
def test_cache_holds_the_training_forwards_tensors(separate):
    """After a prefill and decoding by mixed chunks, the cache holds what the training forward
    makes: every compressed key (rotated) and value, the rotated raw keys and values of each
    branch, and the last block_size un-rotated compression inputs in the ring."""
    layer = make_layer("mlp", separate, seed=7)
    B, T, l = 2, 131, HYPER["block_size"]
    x = torch.randn(B, T, HIDDEN, dtype=F64)
    cache = shuffled_paged(layer, B, T)
    layer(x[:, :20], cache=cache)
    t = 20
    for S in [1, 5, 1, 16, 17, 1, 33, 2, 1, 5, 1, 16, T]:
        S = min(S, T - t)
        layer(x[:, t:t + S], cache=cache)
        t += S
    with torch.no_grad():
        p = layer._project(x, None, None, None)
    nc = reference.num_cmp_tokens(T, l, HYPER["block_stride"])
    assert_close(cache.k_cmp[:, :nc], p.k_cmp, 1e-12, "compressed keys")
    assert_close(cache.v_cmp[:, :nc], p.v_cmp, 1e-12, "compressed values")
    names = ("k", "v", "k_swa", "v_swa")
    for name, want in zip(names, p.raw):
        got = torch.stack([reference.cache_tokens(getattr(cache, name), T, b, cache.block_table)
                           for b in range(B)])
        assert_close(got, want, 1e-12, f"raw {name}")
    slots = torch.arange(T - l, T) % l
    assert_close(cache.ring_k[:, slots], p.k_c[:, T - l:], 1e-12, "ring keys")
    assert_close(cache.ring_v[:, slots], p.v_c[:, T - l:], 1e-12, "ring values")


def test_position_ids():
    """Positions given to the prefill and to every step (shifted by 1000: the rotary embedding is
    relative, the output unchanged) and defaults from the cache's lengths agree with the
    training forward at those positions."""
    layer = make_layer(seed=11)
    x = torch.randn(2, 80, HIDDEN, dtype=F64)
    pos = torch.arange(80)[None].expand(2, 80) + 1000
    with torch.no_grad():
        full = layer(x, position_ids=pos)
    cache = NSACache(layer, 2, 80)
    assert_close(layer(x[:, :40], position_ids=pos[:, :40], cache=cache), full[:, :40], 1e-9, "prefill")
    for t in range(40, 80, 4):
        y = layer(x[:, t:t + 4], position_ids=pos[:, t:t + 4], cache=cache)
        assert_close(y, full[:, t:t + 4], 1e-9, f"tokens {t}..")
    cache.reset()
    layer(x[:, :40], cache=cache)
    assert_close(layer(x[:, 40:], cache=cache), full[:, 40:], 1e-9, "default positions")


def test_reset_and_reuse():
    """reset() empties the cache for a new prompt (nothing else to clear); reset(b) empties one
    sequence, which then decodes from position 0 beside the others."""
    layer = make_layer(seed=12)
    x = torch.randn(2, 60, HIDDEN, dtype=F64)
    with torch.no_grad():
        full = layer(x)
    cache = NSACache(layer, 2, 64)
    layer(torch.randn(2, 50, HIDDEN, dtype=F64), cache=cache)
    cache.reset()
    assert cache.lengths == [0, 0] and cache.seqlens.tolist() == [0, 0]
    layer(x[:, :45], cache=cache)
    assert_close(layer(x[:, 45:], cache=cache), full[:, 45:], 1e-9, "after reset")
    # Row 1 restarts: its first 45 tokens go in by three chunks beside row 0's next tokens.
    other = torch.randn(1, 60, HIDDEN, dtype=F64)
    with torch.no_grad():
        other_full = layer(other)
    cache.reset()
    layer(x[:, :15], cache=cache)
    cache.reset(1)
    assert cache.lengths == [15, 0] and cache.seqlens.tolist() == [15, 0]
    for t in range(0, 45, 15):
        y = layer(torch.cat([x[:1, 15 + t:30 + t], other[:, t:t + 15]]), cache=cache)
        assert_close(y[:1], full[:1, 15 + t:30 + t], 1e-9, f"row 0 at {15 + t}")
        assert_close(y[1:], other_full[:, t:t + 15], 1e-9, f"row 1 at {t}")
    assert cache.lengths == [60, 45]


def test_pages_assigned_as_sequences_grow():
    """A serving engine's own pools and block table, pages handed out as the sequences grow
    (-1: not assigned yet): set_block_table_row checks each row once; a step that would need an
    unassigned page raises before writing anything."""
    layer = make_layer(seed=13)
    B, page, T = 2, 32, 100
    H, D, Dv = 1, 8, 6
    pools = dict(k_pool=torch.zeros(9, page, H, D, dtype=F64),
                 v_pool=torch.zeros(9, page, H, Dv, dtype=F64))
    table = torch.full((B, 4), -1, dtype=torch.int32)
    table[0, 0], table[1, 0] = 7, 2
    cache = NSACache.paged(layer, B, page_size=page, max_pages=4, block_table=table, **pools)
    assert cache.k is pools["k_pool"] and cache.num_pages == 9
    assert cache.capacity_of(0) == cache.capacity_of(1) == page
    x = torch.randn(B, T, HIDDEN, dtype=F64)
    with torch.no_grad():
        full = layer(x)
    layer(x[:, :30], cache=cache)
    # What a CUDA graph replay, which runs no host check, would do past the assigned pages: the
    # write into page -1 is out of range, not wrapped to the pool's last page.
    b, t = torch.tensor([[1]]), torch.tensor([[page]])
    with pytest.raises(IndexError, match="out of bounds"):
        cache.write_raw(b, t, (torch.ones(1, 1, H, D, dtype=F64), torch.ones(1, 1, H, Dv, dtype=F64)))
    assert cache.k[-1].abs().sum() == 0
    free = [4, 0, 8, 1, 5, 3]
    for t in range(30, T):
        for b in range(B):
            if cache.lengths[b] == cache.capacity_of(b):
                with pytest.raises(ValueError, match=f"sequence {b} of the cache holds {t} tokens "
                                                     f"and gets 1 more, but its "
                                                     f"{t // page} assigned pages"):
                    layer(x[:, t:t + 1], cache=cache)
                row = cache.block_table[b].tolist()
                cache.set_block_table_row(b, row[:t // page] + [free.pop()])
        assert_close(layer(x[:, t:t + 1], cache=cache), full[:, t:t + 1], 1e-9, f"token {t}")
    assert not free


def test_bytes_per_sequence():
    for separate in (False, True):
        layer = make_layer(separate=separate)
        cache = NSACache(layer, 3, 100)
        tensors = [cache.k, cache.v, cache.k_swa, cache.v_swa, cache.k_cmp_rows, cache.v_cmp_rows,
                   cache.ring_k, cache.ring_v, cache.seqlens]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        assert cache.bytes_per_sequence() * 3 == total


def test_bfloat16_on_cpu(monkeypatch):
    """A bf16 layer decoding token by token and by chunks, against the bf16 training forward and
    the float64 one of the same weights: within the bf16 tolerance (1e-2), and not much further
    from float64 than the bf16 training forward is."""
    layer = make_layer("mlp", seed=14, dtype=torch.bfloat16)
    ref = make_layer("mlp", seed=14)
    ref.load_state_dict({k: v.to(F64) for k, v in layer.state_dict().items()})
    x = torch.randn(2, 120, HIDDEN, dtype=F64)
    with torch.no_grad():
        full64 = ref(x)
    for chunk, paged in ((1, False), (7, True)):
        cache = make_cache(layer, 2, 120, paged)
        assert cache.dtype == torch.bfloat16
        full, y = teacher_forcing(layer, x.bfloat16(), 17, chunk, cache, bound=1e-2)
        assert y.dtype == torch.bfloat16
        assert_close(y, full64, 1e-2, "bf16 decode against float64")
        assert rel_err(y, full64) <= 1.5 * rel_err(full, full64)


# ---------------------------------------------------------------------------------- step cost
class OpLog(TorchDispatchMode):
    """The ops dispatched inside it, views aside (they launch nothing): (name, the shapes of its
    tensor arguments) each. On a GPU each is a kernel launch, the cost of a small decoding step."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            shapes = [tuple(t.shape) for t in tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)]
            self.calls.append((str(func.overloadpacket), shapes))
        return func(*args, **(kwargs or {}))

    def names(self):
        return [name for name, _ in self.calls]


# Ops not one step needs: each is something made again at every step (an arange, the rotary
# frequencies, a tensor of host values, a cast that float64 does not need) or a host read.
NOT_PER_STEP = ("aten.arange", "aten.pow", "aten.reciprocal", "aten.lift_fresh", "aten._to_copy",
                "aten._local_scalar_dense")


def logged_steps(layer, cache, x, t0):
    """Prefills x[:, :t0], then logs each one-token step from t0 + 1 on (the step at t0 makes
    the cache's constants)."""
    with torch.no_grad():
        layer(x[:, :t0], cache=cache)
        layer(x[:, t0:t0 + 1], cache=cache)
        logs = []
        for t in range(t0 + 1, x.shape[1]):
            with OpLog() as log:
                layer(x[:, t:t + 1], cache=cache)
            logs.append(log)
    return logs


def check_step_cost(logs, bound):
    """Every step dispatches the same ops on the same shapes (nothing depends on the lengths: a
    CUDA graph of one replays them all), at most `bound` of them, none of NOT_PER_STEP, and the
    rotary angles' cos and sin once each (one rotation for queries and keys)."""
    first = logs[0]
    for i, log in enumerate(logs[1:], 1):
        assert log.calls == first.calls, f"step {i} differs from step 0"
    names = first.names()
    assert not set(names) & set(NOT_PER_STEP), names
    assert len(names) <= bound, f"{len(names)} ops > {bound}: {names}"
    assert names.count("aten.cos") == names.count("aten.sin") == 1, names


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
def test_decode_step_op_count(separate, paged):
    """A one-token step of the float64 layer on the CPU, at lengths 41 .. 79 (across compression
    windows and selection blocks): the same ops on the same shapes each time, and few: 51 with
    shared K/V, contiguous (the five projections and phi's four matmuls; the indices from one
    table lookup, five ops; one rotation; one index write per cache buffer; the decode op), 4
    more through a block table, 10 more with K/V of each branch's own; 112 to 143 before the
    step was trimmed."""
    layer = make_layer("mlp", separate)
    logs = logged_steps(layer, make_cache(layer, 2, 80, paged), torch.randn(2, 80, HIDDEN, dtype=F64), 40)
    check_step_cost(logs, 56 + 4 * paged + 10 * separate)
    names = logs[0].names()
    assert names.count("aten.index_put_") == 6 + 2 * separate and "aten.nonzero" not in names


def test_dense_decode_step_op_count():
    """The dense baseline's step (FullAttention with a StaticKVCache): the same ops and shapes at
    every length (it attends the whole capacity under a mask from its device-side length), no
    more than 40 of them."""
    torch.manual_seed(0)
    layer = FullAttention(HIDDEN, 4, 1, 8, 6).to(F64)
    cache = StaticKVCache.for_layer(layer, 2, 80)
    x = torch.randn(2, 80, HIDDEN, dtype=F64)
    with torch.no_grad():
        full = layer(x)
    logs = logged_steps(layer, cache, x, 40)
    check_step_cost(logs, 40)
    assert cache.length == 80 and int(cache.seqlen) == 80
    cache = StaticKVCache.for_layer(layer, 2, 80)
    with torch.no_grad():
        y = torch.cat([layer(x[:, :40], cache=cache)] + [layer(x[:, t:t + 3], cache=cache)
                                                        for t in range(40, 80, 3)], 1)
    assert_close(y, full, 1e-12, "decoded by chunks of 3 (the last of 1)")


# ---------------------------------------------------------------------------------- bad input
def prefilled(layer=None, B=2, T=10, capacity=40, **kw):
    layer = layer or make_layer()
    cache = NSACache(layer, B, capacity, **kw)
    layer(torch.randn(B, T, HIDDEN, dtype=F64), cache=cache)
    return layer, cache


def assert_untouched(cache, lengths):
    assert cache.lengths == lengths and cache.seqlens.tolist() == lengths


def test_error_more_tokens_than_capacity():
    layer = make_layer()
    cache = NSACache(layer, 2, 40)
    with pytest.raises(ValueError, match=r"NativeSparseAttention: sequence 0 of the cache holds 0 "
                                         r"tokens and gets 41 more, but the cache's capacity is 40"):
        layer(torch.randn(2, 41, HIDDEN, dtype=F64), cache=cache)
    assert_untouched(cache, [0, 0])
    layer(torch.randn(2, 38, HIDDEN, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match="holds 38 tokens and gets 3 more, but the cache's capacity is 40"):
        layer(torch.randn(2, 3, HIDDEN, dtype=F64), cache=cache)
    assert_untouched(cache, [38, 38])
    layer(torch.randn(2, 2, HIDDEN, dtype=F64), cache=cache)  # exactly full
    with pytest.raises(ValueError, match="holds 40 tokens and gets 1 more"):
        layer(torch.randn(2, 1, HIDDEN, dtype=F64), cache=cache)
    # Packed: the longest sequence does not fit its row.
    cache = NSACache(layer, 2, 40)
    with pytest.raises(ValueError, match="sequence 1 of the cache holds 0 tokens and gets 50 more"):
        layer(torch.randn(1, 55, HIDDEN, dtype=F64), cache=cache, cu_seqlens=cu_seqlens_of([5, 50]))
    # Paged: max_pages * page_size.
    cache = NSACache.paged(layer, 2, page_size=32, max_pages=2)
    with pytest.raises(ValueError, match="holds 0 tokens and gets 65 more, but its 2 assigned "
                                         "pages of 32 hold 64"):
        layer(torch.randn(2, 65, HIDDEN, dtype=F64), cache=cache)


@pytest.mark.parametrize("change,match", [
    (dict(H=2, G=2), "num_kv_heads = 1 in the cache, 2 in the layer"),
    (dict(D=16), "head_dim = 8 in the cache, 16 in the layer"),
    (dict(Dv=8), "v_head_dim = 6 in the cache, 8 in the layer"),
    (dict(block_size=16), "block_size = 32 in the cache, 16 in the layer"),
    (dict(block_stride=8), "block_stride = 16 in the cache, 8 in the layer"),
    (dict(select_size=64), "select_size = 32 in the cache, 64 in the layer"),
    (dict(separate=True), "separate_branch_kv = False in the cache, True in the layer"),
])
def test_error_cache_of_another_layer(change, match):
    _, cache = prefilled()
    other = make_layer(**change)
    with pytest.raises(ValueError, match="NativeSparseAttention: the cache was built for another "
                                         "layer: " + match):
        other(torch.randn(2, 1, HIDDEN, dtype=F64), cache=cache)
    assert_untouched(cache, [10, 10])
    with pytest.raises(ValueError, match=match):  # an empty cache too
        other(torch.randn(2, 5, HIDDEN, dtype=F64), cache=NSACache(make_layer(), 2, 40))


def test_error_dtype_and_device():
    layer = make_layer()
    match = (r"NativeSparseAttention: the cache holds torch.float32, the layer's attention runs "
             r"in torch.float64 \(build the cache with dtype=torch.float64\)")
    empty = NSACache(layer, 2, 40, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 5, HIDDEN, dtype=F64), cache=empty)
    assert_untouched(empty, [0, 0])
    cache = NSACache(layer, 2, 40, dtype=torch.float32)
    make_layer(dtype=torch.float32)(torch.randn(2, 10, HIDDEN), cache=cache)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(2, 1, HIDDEN, dtype=F64), cache=cache)
    assert_untouched(cache, [10, 10])
    cache = NSACache(layer, 2, 40, device="meta")
    with pytest.raises(ValueError, match="NativeSparseAttention: the cache is on meta, "
                                         "hidden_states on cpu"):
        layer(torch.randn(2, 3, HIDDEN, dtype=F64), cache=cache)


def test_error_batch_and_packing():
    layer, cache = prefilled()
    with pytest.raises(ValueError, match="NativeSparseAttention: hidden_states holds B = 3 "
                                         "sequences, the cache 2"):
        layer(torch.randn(3, 1, HIDDEN, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match=r"NativeSparseAttention: cu_seqlens \(a packed prompt\) "
                                         r"needs an empty cache, got one holding \[10, 10\] tokens"):
        layer(torch.randn(1, 4, HIDDEN, dtype=F64), cache=cache, cu_seqlens=cu_seqlens_of([2, 2]))
    with pytest.raises(ValueError, match="hidden_states must hold at least one token"):
        layer(torch.randn(2, 0, HIDDEN, dtype=F64), cache=cache)
    assert_untouched(cache, [10, 10])
    empty = NSACache(layer, 2, 40)
    with pytest.raises(ValueError, match=r"cu_seqlens holds 3 sequences, the cache 2 \(sequence s "
                                         r"of the pack fills batch row s\)"):
        layer(torch.randn(1, 6, HIDDEN, dtype=F64), cache=empty, cu_seqlens=cu_seqlens_of([2, 2, 2]))
    with pytest.raises(ValueError, match="hidden_states holds B = 1 sequences, the cache 2"):
        layer(torch.randn(1, 6, HIDDEN, dtype=F64), cache=empty)
    with pytest.raises(TypeError, match="NativeSparseAttention: cache must be an "
                                        "nsa_torch.NSACache, got dict"):
        layer(torch.randn(2, 1, HIDDEN, dtype=F64), cache={})
    assert_untouched(empty, [0, 0])


def test_error_construction():
    layer = make_layer()
    with pytest.raises(ValueError, match="NSACache: capacity must be a positive int, got 0"):
        NSACache(layer, 2, 0)
    with pytest.raises(ValueError, match="NSACache: batch_size must be a positive int, got -1"):
        NSACache(layer, -1, 8)
    with pytest.raises(TypeError, match="NSACache: expected a NativeSparseAttention or an "
                                        "NSAConfig, got int"):
        NSACache(3, 2, 8)
    with pytest.raises(ValueError, match=r"NSACache.paged: page_size must be a multiple of the "
                                         r"layer's select_size \(32\), got 48"):
        NSACache.paged(layer, 2, page_size=48, max_pages=2)
    with pytest.raises(ValueError, match=r"num_pages must be >= batch_size \* max_pages = 4, got 3"):
        NSACache.paged(layer, 2, page_size=32, max_pages=2, num_pages=3)
    pool = dict(k_pool=torch.zeros(5, 32, 1, 8, dtype=F64), v_pool=torch.zeros(5, 32, 1, 6, dtype=F64))
    table = torch.tensor([[0, 1], [2, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"NSACache: block_table row 1 must hold pages in \[0, "
                                         r"num_pages = 5\), then only -1 \(not assigned\), got \[2, 5\]"):
        NSACache.paged(layer, 2, page_size=32, max_pages=2, block_table=table, **pool)
    with pytest.raises(ValueError, match=r"got \[-1, 3\]"):  # a hole before an assigned page
        NSACache.paged(layer, 2, page_size=32, max_pages=2,
                       block_table=torch.tensor([[0, 1], [-1, 3]], dtype=torch.int32), **pool)
    with pytest.raises(ValueError, match=r"block_table must be int32 on cpu \[batch_size, max_pages\] "
                                         r"= \[2, 2\], got torch.int64 on cpu \[2, 2\]"):
        NSACache.paged(layer, 2, page_size=32, max_pages=2, block_table=table.long(), **pool)
    with pytest.raises(ValueError, match=r"v_pool must be torch.float64 on cpu \[num_pages, "
                                         r"page_size, H, C\] = \[5, 32, 1, 6\], got torch.float64 "
                                         r"on cpu \[5, 32, 1, 8\]"):
        NSACache.paged(layer, 2, page_size=32, max_pages=2, k_pool=pool["k_pool"],
                       v_pool=torch.zeros(5, 32, 1, 8, dtype=F64))
    with pytest.raises(ValueError, match="pass all of k_pool, v_pool, k_swa_pool, v_swa_pool"):
        NSACache.paged(make_layer(separate=True), 2, page_size=32, max_pages=2, **pool)
    with pytest.raises(ValueError, match="pass all of k_pool, v_pool .the layer has "
                                         "separate_branch_kv=False"):
        NSACache.paged(layer, 2, page_size=32, max_pages=2, k_pool=pool["k_pool"])


def test_error_set_block_table_row():
    layer = make_layer()
    cache = NSACache.paged(layer, 2, page_size=32, max_pages=2, num_pages=6)
    layer(torch.randn(2, 40, HIDDEN, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match=r"block_table row 0 must hold pages in \[0, num_pages = 6\)"):
        cache.set_block_table_row(0, [0, 6])
    with pytest.raises(ValueError, match="sequence 1 holds 40 tokens, which need 2 pages, got 1"):
        cache.set_block_table_row(1, [2])
    with pytest.raises(ValueError, match="at most max_pages = 2 pages, got 3"):
        cache.set_block_table_row(1, [2, 3, 4])
    with pytest.raises(ValueError, match=r"b must be in \[0, 2\), got 2"):
        cache.set_block_table_row(2, [2])
    with pytest.raises(ValueError, match="the cache is contiguous, not paged"):
        NSACache(layer, 2, 8).set_block_table_row(0, [0])
    assert cache.block_table.tolist() == [[0, 1], [2, 3]]
    cache.set_block_table_row(1, torch.tensor([5, 4]))
    assert cache.block_table.tolist() == [[0, 1], [5, 4]]


# ---------------------------------------------------------------------------------- CUDA
def cuda_layer(separate=False, seed=20):
    """A layer of the CUDA kernels' head dims (D = Dv = 64), G = 4, paper-like block sizes with
    a short window and few selected blocks."""
    torch.manual_seed(seed)
    layer = nsa_torch.NativeSparseAttention(256, 8, 2, 64, block_size=32, block_stride=16,
                                            select_size=64, num_selected=4, window_size=128,
                                            separate_branch_kv=separate)
    with torch.no_grad():  # every path live
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)))
    return layer


def twin(layer, device, dtype):
    other = nsa_torch.NativeSparseAttention.from_config(layer.config)
    other.load_state_dict(layer.state_dict())
    return other.to(device, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
def test_cuda_decode_matches_cpu_forward(separate, paged):
    """bf16 on CUDA: a packed prompt of sequences of different lengths (some shorter than a
    compression window), then steps of 1 and chunks of 5 and 64 tokens, each row against the
    float64 CPU training forward of its sequence, within the layer's bf16 tolerance (5e-2)."""
    ref = twin(cuda_layer(separate), "cpu", F64)
    gpu = twin(ref, "cuda", torch.bfloat16)
    lengths, steps = [300, 17, 64, 129], [1] * 40 + [5] * 6 + [64]
    T = [n + sum(steps) for n in lengths]
    xs = [torch.randn(1, n, 256, dtype=F64) for n in T]
    with torch.no_grad():
        full = [ref(x) for x in xs]
    B = len(lengths)
    cache = (shuffled_paged(gpu, B, max(T), page_size=64) if paged
             else NSACache(gpu, B, max(T)))
    assert cache.dtype == torch.bfloat16 and cache.device.type == "cuda"
    cu = cu_seqlens_of(lengths)
    packed = torch.cat([x[:, :n] for x, n in zip(xs, lengths)], 1)
    y = gpu(packed.to("cuda", torch.bfloat16), cache=cache, cu_seqlens=cu)
    ys = [[y[:, a:b].double().cpu()] for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    done = 0
    for S in steps:
        x = torch.cat([x[:, n + done:n + done + S] for x, n in zip(xs, lengths)], 0)
        y = gpu(x.to("cuda", torch.bfloat16), cache=cache).double().cpu()
        for s in range(B):
            ys[s].append(y[s:s + 1])
        done += S
    assert cache.seqlens.tolist() == T and cache.lengths == T
    for s in range(B):
        assert_close(torch.cat(ys[s], 1), full[s], 5e-2, f"sequence {s}")
        assert_close(torch.cat(ys[s][1:], 1), full[s][:, lengths[s]:], 5e-2, f"decoded {s}")


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_cuda_graph_step(paged):
    """One decoding step captured in a CUDA graph (static input buffer) and replayed for 40
    tokens, crossing compression windows and a selection block, against the same steps run
    eagerly on a twin cache: the same outputs; seqlens advance on the device at each replay and
    sync_lengths brings the host lengths back in step."""
    layer = twin(cuda_layer(), "cuda", torch.bfloat16)
    B, t0, n = 3, 90, 40
    x = torch.randn(B, t0 + 2 + n, 256, device="cuda", dtype=torch.bfloat16)

    def new_cache():
        return shuffled_paged(layer, B, 256, page_size=64) if paged else NSACache(layer, B, 256)
    eager, graphed = new_cache(), new_cache()
    with torch.no_grad():
        for cache in (eager, graphed):
            layer(x[:, :t0], cache=cache)
        # Warm-up on a side stream (as torch.cuda.graphs asks), which is also token t0.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x[:, t0:t0 + 1], cache=graphed)
        torch.cuda.current_stream().wait_stream(side)
        layer(x[:, t0:t0 + 1], cache=eager)
        static_x = torch.empty_like(x[:, :1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x, cache=graphed)
        # Capturing ran nothing on the device but the Python that counts the host lengths.
        assert graphed.seqlens.tolist() == [t0 + 1] * B
        outs = []
        for t in range(t0 + 1, t0 + 1 + n):
            static_x.copy_(x[:, t:t + 1])
            graph.replay()
            outs.append(static_y.clone())
        want = [layer(x[:, t:t + 1], cache=eager) for t in range(t0 + 1, t0 + 1 + n)]
    torch.cuda.synchronize()
    assert graphed.seqlens.tolist() == eager.seqlens.tolist() == [t0 + 1 + n] * B
    graphed.sync_lengths()
    assert graphed.lengths == eager.lengths
    for i, (a, b) in enumerate(zip(outs, want)):
        assert torch.isfinite(a).all(), f"replay {i}"
        assert_close(a.double(), b.double(), 1e-2, f"replay {i} against eager")
    assert_close(graphed.k_cmp.double(), eager.k_cmp.double(), 1e-2, "compressed keys")


@pytest.mark.cuda
def test_cuda_constants_made_in_a_capture_are_not_kept():
    """A step's constant made inside a CUDA graph capture is filled only when the graph
    replays: the cache does not keep it for later eager steps, and keeps the next one made
    outside."""
    constants = DeviceConstants()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = constants.get("a", lambda: torch.arange(4, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert captured.tolist() == [0, 1, 2, 3]
    eager = constants.get("a", lambda: torch.arange(4, device="cuda") + 10)
    assert eager.tolist() == [10, 11, 12, 13]
    assert constants.get("a", lambda: None) is eager
