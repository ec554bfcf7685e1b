"""NSACache: one NativeSparseAttention layer's decoding state for a batch of B sequences.

    cache = nsa_torch.NSACache(layer, batch_size=4, capacity=8192)
    y = layer(prompt, cache=cache)          # prefill: [4, T, hidden], fills the cache
    y = layer(next_tokens, cache=cache)     # decode: [4, S, hidden], the next S tokens of each

What it holds (C = D for keys, Dv for values; docs/design.md, "Decoding"):
- the raw keys (rotated at their positions) and values of the selected branch, which the window
  branch shares unless the layer has separate_branch_kv (then `k_swa`, `v_swa` too): contiguous
  [B, capacity, H, C] (token t of sequence b at [b, t]), or page pools [num_pages, page_size,
  H, C] with `block_table` int32 [B, max_pages] (token t of sequence b at row t % page_size of
  page block_table[b, t // page_size]; page_size a multiple of select_size);
- the compressed keys (rotated at their window's last position) and values, [B, Nc(capacity) + 1,
  H, C]: row i is compressed token i; the last row is a scratch target, so that a decoding step
  writes every candidate compressed token unconditionally (the ones whose window is not complete
  go there). `k_cmp` / `v_cmp` are the views without it;
- the ring of the last block_size un-rotated compression inputs (the compressed branch's K and V
  before phi), token t at slot t % block_size: what the next compression windows need;
- `seqlens` (int32 [B], on the device: what a step reads, so that it never waits for the host
  and can be captured in a CUDA graph) and `lengths` (the same on the host, a list of ints that
  the layer keeps in step; only for errors raised before anything is written);
- `constants`: what a step would otherwise rebuild each time (its index tables, aranges, the
  rotary frequencies), made on first use.

Bytes per sequence (e = dtype size, H kv heads, contiguous; paged: the pages it uses):
    e * H * (D + Dv) * (capacity * (2 if separate_branch_kv else 1) + Nc(capacity) + 1
                        + block_size) + 4
with Nc(capacity) = (capacity - block_size) // block_stride + 1: about 1 + 1/block_stride times
the dense KV cache.
"""
import math
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from .reference import num_cmp_tokens

_WHERE = "nsa_torch.NSACache"

# The layer config fields the cache's contents depend on.
_LAYOUT_FIELDS = ("num_kv_heads", "head_dim", "v_head_dim", "block_size", "block_stride",
                  "select_size", "separate_branch_kv")


def _config_of(layer_or_config):
    config = getattr(layer_or_config, "config", layer_or_config)
    if not all(hasattr(config, f) for f in _LAYOUT_FIELDS):
        raise TypeError(f"{_WHERE}: expected a NativeSparseAttention or an NSAConfig, got "
                        f"{type(layer_or_config).__name__}")
    return config


def _defaults(layer_or_config, device, dtype):
    """device and dtype from the layer's parameters where not given: the dtype the layer's
    attention runs in (its projections', except float32 on CUDA: bfloat16)."""
    param = None
    if isinstance(layer_or_config, torch.nn.Module):
        param = next(layer_or_config.parameters(), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if dtype is None:
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        if dtype == torch.float32 and device.type == "cuda":
            dtype = torch.bfloat16
    return device, dtype


class DeviceConstants:
    """Device tensors that depend only on a key (aranges, index tables, rotary frequencies), made
    once per key: a decoding step then builds no tensor, launches nothing to make one, and keeps
    its work to the few ops that depend on the lengths. One per cache (its device is the
    cache's)."""

    def __init__(self):
        self._made = {}

    def get(self, key, make: Callable[[], torch.Tensor], keep: bool = True):
        """make() once for `key`, then the same tensor; made again each time when not `keep`,
        under torch.compile (which traces it instead) and inside a CUDA graph capture (a tensor
        made there is filled only at each replay: eager code must not read it later)."""
        found = self._made.get(key)
        if found is not None:
            return found
        made = make()
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if keep and not capturing and not torch.compiler.is_compiling():
            self._made[key] = made
        return made


class StepIndex(NamedTuple):
    """Where a step of S new tokens per sequence reads and writes (NSACache.step_index): int64
    device tensors, with K = ceil(S / block_stride) compression candidates per sequence,
    l = block_size and m = min(S, l)."""

    tok: torch.Tensor   # [B, S + K]: the new tokens 0 .. S-1, then the token of each candidate
    pos: torch.Tensor   # [B, S + K]: their positions, seqlens + tok
    row: torch.Tensor   # [B, K]: each candidate's compressed row; -1 (the scratch row) for none
    src: torch.Tensor   # [B, K, l]: each candidate's window in ring ++ the S new inputs
    slot: torch.Tensor  # [B, m]: the ring slots of the last m new tokens


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{_WHERE}: {name} must be a positive int, got {value!r}")


class NSACache:
    """One layer's decoding state for a batch of B sequences (see the module docstring).

    NSACache(layer, batch_size, capacity, device=None, dtype=None): contiguous, `capacity`
    tokens per sequence. NSACache.paged(...): page pools and a block table, possibly a serving
    engine's own. `layer` is the NativeSparseAttention (device and dtype default to its
    attention's) or its NSAConfig. Pass the cache to the layer's forward (`cache=`); the layer
    prefills it when every sequence is empty and appends to it otherwise.
    """

    def __init__(self, layer, batch_size: int, capacity: int, *, device=None, dtype=None):
        config = _config_of(layer)
        device, dtype = _defaults(layer, device, dtype)
        _positive_int("batch_size", batch_size)
        _positive_int("capacity", capacity)
        H, D, Dv = config.num_kv_heads, config.head_dim, config.v_head_dim
        self._setup(config, batch_size, capacity, device, dtype)
        pools = [torch.zeros(batch_size, capacity, H, C, device=device, dtype=dtype)
                 for C in self._raw_dims_of(config)]
        self._set_raw(pools, block_table=None, page_size=capacity)

    @classmethod
    def paged(cls, layer, batch_size: int, *, page_size: int, max_pages: int,
              num_pages: Optional[int] = None, block_table: Optional[torch.Tensor] = None,
              k_pool: Optional[torch.Tensor] = None, v_pool: Optional[torch.Tensor] = None,
              k_swa_pool: Optional[torch.Tensor] = None, v_swa_pool: Optional[torch.Tensor] = None,
              device=None, dtype=None) -> "NSACache":
        """A cache whose raw K/V live in page pools [num_pages, page_size, H, D|Dv] (page_size a
        multiple of the layer's select_size) and a block table int32 [batch_size, max_pages]:
        a sequence holds at most max_pages * page_size tokens.

        The pools are new (zeros) unless given: a serving engine may pass its own k_pool /
        v_pool (and k_swa_pool / v_swa_pool with separate_branch_kv), all four or none; then
        num_pages, device and dtype come from them. block_table: the engine's (checked once
        here, on the host: entries in [0, num_pages), or -1 for pages not assigned yet, only
        after the assigned ones) or, when None, a new one giving sequence b the pages
        b * max_pages .. (b + 1) * max_pages - 1 (num_pages defaults to batch_size *
        max_pages). Change a row later with set_block_table_row, which checks it the same way:
        the layer never writes to a page that was not checked.
        """
        config = _config_of(layer)
        _positive_int("batch_size", batch_size)
        _positive_int("page_size", page_size)
        _positive_int("max_pages", max_pages)
        if page_size % config.select_size:
            raise ValueError(f"{_WHERE}.paged: page_size must be a multiple of the layer's "
                             f"select_size ({config.select_size}), got {page_size}")
        self = cls.__new__(cls)
        given = [p for p in (k_pool, v_pool, k_swa_pool, v_swa_pool) if p is not None]
        H, D, Dv = config.num_kv_heads, config.head_dim, config.v_head_dim
        if given:
            names = ("k_pool", "v_pool") + (("k_swa_pool", "v_swa_pool")
                                            if config.separate_branch_kv else ())
            pools = [k_pool, v_pool, k_swa_pool, v_swa_pool][:len(names)]
            if any(p is None for p in pools) or len(given) != len(names):
                raise ValueError(f"{_WHERE}.paged: pass all of {', '.join(names)} (the layer "
                                 f"has separate_branch_kv={config.separate_branch_kv}) or none")
            first = pools[0]
            device, dtype = first.device, first.dtype
            if num_pages is None:
                num_pages = first.shape[0] if first.dim() == 4 else -1
            for name, pool, C in zip(names, pools, (D, Dv, D, Dv)):
                want = (num_pages, page_size, H, C)
                if tuple(pool.shape) != want or pool.dtype != dtype or pool.device != device:
                    raise ValueError(f"{_WHERE}.paged: {name} must be {dtype} on {device} "
                                     f"[num_pages, page_size, H, C] = {list(want)}, got "
                                     f"{pool.dtype} on {pool.device} {list(pool.shape)}")
                if pool.stride(-1) != 1:
                    raise ValueError(f"{_WHERE}.paged: {name} must have a contiguous last dim, "
                                     f"got strides {pool.stride()}")
        else:
            device, dtype = _defaults(layer, device, dtype)
            if num_pages is None:
                num_pages = batch_size * max_pages
            _positive_int("num_pages", num_pages)
            pools = [torch.zeros(num_pages, page_size, H, C, device=device, dtype=dtype)
                     for C in self._raw_dims_of(config)]
        self._setup(config, batch_size, max_pages * page_size, device, dtype)
        if block_table is None:
            if num_pages < batch_size * max_pages:
                raise ValueError(f"{_WHERE}.paged: without a block_table every sequence gets "
                                 f"max_pages pages of its own: num_pages must be >= batch_size "
                                 f"* max_pages = {batch_size * max_pages}, got {num_pages}")
            block_table = torch.arange(batch_size * max_pages, dtype=torch.int32,
                                       device=device).view(batch_size, max_pages)
        self.num_pages, self.max_pages = num_pages, max_pages
        self._set_raw(pools, block_table=block_table, page_size=page_size)
        return self

    # ------------------------------------------------------------------------------ layout
    @staticmethod
    def _raw_dims_of(config):
        D, Dv = config.head_dim, config.v_head_dim
        return (D, Dv, D, Dv) if config.separate_branch_kv else (D, Dv)

    def _setup(self, config, batch_size, capacity, device, dtype):
        """Everything but the raw K/V: the compressed rows (+ scratch), the ring, the lengths."""
        if not (dtype.is_floating_point):
            raise ValueError(f"{_WHERE}: dtype must be a floating-point dtype, got {dtype}")
        self.config = {f: getattr(config, f) for f in _LAYOUT_FIELDS}
        self.batch_size, self.capacity, self.dtype = batch_size, capacity, dtype
        H, D, Dv = config.num_kv_heads, config.head_dim, config.v_head_dim
        l, d = config.block_size, config.block_stride
        self.block_size, self.block_stride = l, d
        self.cmp_capacity = num_cmp_tokens(capacity, l, d)
        rows = self.cmp_capacity + 1
        self.k_cmp_rows = torch.zeros(batch_size, rows, H, D, device=device, dtype=dtype)
        self.v_cmp_rows = torch.zeros(batch_size, rows, H, Dv, device=device, dtype=dtype)
        self.ring_k = torch.zeros(batch_size, l, H, D, device=device, dtype=dtype)
        self.ring_v = torch.zeros(batch_size, l, H, Dv, device=device, dtype=dtype)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.device = self.seqlens.device  # (with its index: "cuda" becomes "cuda:0")
        self.lengths: List[int] = [0] * batch_size
        self.constants = DeviceConstants()
        self._batch = torch.arange(batch_size, device=device)  # (an index of every step)

    def _set_raw(self, pools, block_table, page_size):
        self.k, self.v = pools[0], pools[1]
        self.k_swa, self.v_swa = (pools[2], pools[3]) if len(pools) == 4 else (None, None)
        self.page_size = page_size
        self.block_table = None
        self._pages = None  # paged: pages assigned to each sequence (a host list)
        if block_table is not None:
            self.num_pages = pools[0].shape[0]
            if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32
                    or tuple(block_table.shape) != (self.batch_size, self.max_pages)
                    or block_table.device != self.device):
                got = (f"{block_table.dtype} on {block_table.device} {list(block_table.shape)}"
                       if isinstance(block_table, torch.Tensor) else type(block_table).__name__)
                raise ValueError(f"{_WHERE}.paged: block_table must be int32 on {self.device} "
                                 f"[batch_size, max_pages] = [{self.batch_size}, "
                                 f"{self.max_pages}], got {got}")
            self.block_table = block_table
            self._pages = [self._checked_row(b, row) for b, row in enumerate(block_table.tolist())]

    @property
    def k_cmp(self) -> torch.Tensor:
        """The compressed keys without the scratch row: [B, Nc(capacity), H, D]."""
        return self.k_cmp_rows[:, :self.cmp_capacity]

    @property
    def v_cmp(self) -> torch.Tensor:
        return self.v_cmp_rows[:, :self.cmp_capacity]

    @property
    def is_paged(self) -> bool:
        return self.block_table is not None

    def capacity_of(self, b: int) -> int:
        """Tokens sequence b can hold: capacity, or (paged) its assigned pages' tokens."""
        return self.capacity if self._pages is None else self._pages[b] * self.page_size

    def bytes_per_sequence(self) -> int:
        """The module docstring's formula for this cache (paged: with all max_pages pages)."""
        H, D, Dv = (self.config[f] for f in ("num_kv_heads", "head_dim", "v_head_dim"))
        raw = self.capacity * (2 if self.config["separate_branch_kv"] else 1)
        e = torch.empty(0, dtype=self.dtype).element_size()
        return e * H * (D + Dv) * (raw + self.cmp_capacity + 1 + self.block_size) + 4

    def __repr__(self):
        layout = (f"paged: {self.num_pages} pages of {self.page_size}" if self.is_paged
                  else f"contiguous: capacity {self.capacity}")
        return (f"NSACache(B={self.batch_size}, {layout}, {self.dtype}, {self.device}, "
                f"lengths={self.lengths})")

    # ------------------------------------------------------------------------------ engine API
    def _checked_row(self, b: int, row: Sequence[int]) -> int:
        """Checks one block table row (host ints): entries in [0, num_pages) then only -1;
        returns how many pages are assigned."""
        n = 0
        while n < len(row) and row[n] != -1:
            n += 1
        bad = [p for p in row[:n] if not 0 <= p < self.num_pages]
        if bad or any(p != -1 for p in row[n:]):
            raise ValueError(f"{_WHERE}: block_table row {b} must hold pages in [0, num_pages = "
                             f"{self.num_pages}), then only -1 (not assigned), got {list(row)}")
        return n

    def set_block_table_row(self, b: int, pages: Sequence[int]) -> None:
        """Gives sequence b the pages `pages` (host ints, at most max_pages; the rest of the row
        becomes -1), after checking them: inside the pool, and enough for the tokens the
        sequence already holds. Copies the row to the device table in place (a CUDA graph that
        captured the table sees it)."""
        if not self.is_paged:
            raise ValueError(f"{_WHERE}.set_block_table_row: the cache is contiguous, not paged")
        if not 0 <= b < self.batch_size:
            raise ValueError(f"{_WHERE}.set_block_table_row: b must be in [0, {self.batch_size}), "
                             f"got {b}")
        pages = [int(p) for p in (pages.tolist() if isinstance(pages, torch.Tensor) else pages)]
        if len(pages) > self.max_pages:
            raise ValueError(f"{_WHERE}.set_block_table_row: at most max_pages = {self.max_pages} "
                             f"pages, got {len(pages)}")
        row = pages + [-1] * (self.max_pages - len(pages))
        n = self._checked_row(b, row)
        if n * self.page_size < self.lengths[b]:
            raise ValueError(f"{_WHERE}.set_block_table_row: sequence {b} holds "
                             f"{self.lengths[b]} tokens, which need "
                             f"{math.ceil(self.lengths[b] / self.page_size)} pages, got {n}")
        self.block_table[b].copy_(torch.tensor(row, dtype=torch.int32))
        self._pages[b] = n

    def reset(self, b: Optional[int] = None) -> None:
        """Empties every sequence (or only sequence b); the buffers and the block table stay.
        Nothing needs zeroing: rows past a sequence's length are never read."""
        rows = range(self.batch_size) if b is None else [b]
        for r in rows:
            self.lengths[r] = 0
        if b is None:
            self.seqlens.zero_()
        else:
            self.seqlens[b] = 0

    def sync_lengths(self) -> None:
        """Reads `seqlens` back into the host `lengths` (waits for the device). Needed only after
        replaying a captured CUDA graph of a step, which advances seqlens without running the
        Python that keeps lengths in step."""
        self.lengths = [int(n) for n in self.seqlens.tolist()]

    def reorder(self, index: torch.Tensor) -> None:
        """Sequence b takes the state of sequence index[b] (beam search), in place: the tensors
        keep their identity (a captured graph keeps reading them). Contiguous caches only (a
        paged one would reorder its block table instead)."""
        if self.is_paged:
            raise ValueError(f"{_WHERE}.reorder: a paged cache reorders its block table, not its "
                             "pools")
        idx = index.to(device=self.device, dtype=torch.int64)
        for t in (self.k, self.v, self.k_swa, self.v_swa, self.k_cmp_rows, self.v_cmp_rows,
                  self.ring_k, self.ring_v, self.seqlens):
            if t is not None:
                t.copy_(t.index_select(0, idx))
        if len(set(self.lengths)) > 1:  # (equal lengths need no host read of index)
            self.lengths = [self.lengths[i] for i in idx.tolist()]

    def resized(self, layer, capacity: int) -> "NSACache":
        """A contiguous copy of this contiguous cache with room for `capacity` >= its own tokens
        per sequence (a new allocation: outside any captured region)."""
        if self.is_paged or capacity < self.capacity:
            raise ValueError(f"{_WHERE}.resized: needs a contiguous cache and capacity >= "
                             f"{self.capacity}, got a {'paged' if self.is_paged else 'contiguous'}"
                             f" cache and {capacity}")
        new = NSACache(layer, self.batch_size, capacity, device=self.device, dtype=self.dtype)
        for name in ("k", "v", "k_swa", "v_swa"):
            old = getattr(self, name)
            if old is not None:
                getattr(new, name)[:, :self.capacity].copy_(old)
        new.k_cmp_rows[:, :self.cmp_capacity].copy_(self.k_cmp)  # (not the scratch row)
        new.v_cmp_rows[:, :self.cmp_capacity].copy_(self.v_cmp)
        new.ring_k.copy_(self.ring_k)
        new.ring_v.copy_(self.ring_v)
        new.seqlens.copy_(self.seqlens)
        new.lengths = list(self.lengths)
        return new

    # ------------------------------------------------------------------------------ checks
    def check_layer(self, where: str, config, device: torch.device,
                    dtype: Optional[torch.dtype] = None) -> None:
        """Raises unless this cache was built for a layer of `config` on `device` (whose
        attention runs in `dtype`, where given)."""
        for f in _LAYOUT_FIELDS:
            if getattr(config, f) != self.config[f]:
                raise ValueError(f"{where}: the cache was built for another layer: {f} = "
                                 f"{self.config[f]} in the cache, {getattr(config, f)} in the "
                                 f"layer")
        if dtype is not None and dtype != self.dtype:
            raise ValueError(f"{where}: the cache holds {self.dtype}, the layer's attention runs "
                             f"in {dtype} (build the cache with dtype={dtype})")
        if torch.device(device) != self.device:
            raise ValueError(f"{where}: the cache is on {self.device}, hidden_states on {device}")

    def check_room(self, where: str, new_tokens: Sequence[int]) -> None:
        """Raises unless sequence b has room for new_tokens[b] more tokens (host lengths)."""
        for b, (n, add) in enumerate(zip(self.lengths, new_tokens)):
            room = self.capacity_of(b)
            if n + add > room:
                what = (f"its {self._pages[b]} assigned pages of {self.page_size} hold {room}"
                        if self.is_paged else f"the cache's capacity is {room}")
                raise ValueError(f"{where}: sequence {b} of the cache holds {n} tokens and gets "
                                 f"{add} more, but {what} tokens")

    # ------------------------------------------------------------------------------ writes
    # Index tensors live on the device and keep their shapes from one step to the next: no
    # host read, so that a step can be captured in a CUDA graph.
    def write_raw(self, b: torch.Tensor, t: torch.Tensor, kv) -> None:
        """Tokens at positions t (int64) of sequences b (int64, broadcast to t's shape) get the
        rotated keys and values kv = (k, v) or (k, v, k_swa, v_swa), each [*t.shape, H, C]."""
        if self.block_table is None:
            index = (b, t)
        else:
            page = self.block_table[b, t // self.page_size]
            # A page of -1 (not assigned) must fail as out of range, not wrap to the pool's last
            # page (the host checks refuse it in eager calls; a CUDA graph replay runs none):
            # it becomes num_pages, the others stay.
            index = (page.remainder(self.num_pages + 1), t % self.page_size)
        bufs = (self.k, self.v, self.k_swa, self.v_swa)
        for buf, x in zip(bufs, kv):
            buf.index_put_(index, x.to(self.dtype))

    def write_cmp(self, b: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Compressed rows `rows` (int64; -1 or cmp_capacity is the scratch row) of sequences b."""
        self.k_cmp_rows.index_put_((b, rows), k.to(self.dtype))
        self.v_cmp_rows.index_put_((b, rows), v.to(self.dtype))

    def write_ring(self, b: torch.Tensor, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The un-rotated compression inputs of tokens t of sequences b into ring slots
        slot = t % block_size (no two tokens of one sequence in one slot)."""
        self.ring_k.index_put_((b, slot), k.to(self.dtype))
        self.ring_v.index_put_((b, slot), v.to(self.dtype))

    # ------------------------------------------------------------------------------ a step
    def step_index(self, S: int) -> StepIndex:
        """Where the next S tokens of every sequence go, from seqlens on the device (see
        StepIndex) in five small ops. Everything but the positions depends on the lengths only
        through seqlens mod block_size: _step_table holds it for each residue, made once per S
        (for S <= block_size; a larger chunk makes its own)."""
        l, d = self.block_size, self.block_stride
        K = -(-S // d)
        table = self.constants.get(("step", S), lambda: self._step_table(S), keep=S <= l)
        t = table[self.seqlens.remainder(l)]                       # [B, S + 2K + K*l + m]
        n = S + 2 * K
        at = t[:, :n] + self.seqlens[:, None]                      # (int64)
        return StepIndex(tok=t[:, :S + K], pos=at[:, :S + K],
                         row=at[:, S + K:n].div(d, rounding_mode="floor").clamp(min=-1),
                         src=t[:, n:n + K * l].view(-1, K, l), slot=t[:, n + K * l:])

    def _step_table(self, S: int) -> torch.Tensor:
        """int64 [block_size, S + 2K + K*l + m]: for each residue r of the length mod l, the
        columns of StepIndex before the length is added: tok, then each candidate's window end
        less l - 1 (its row is (length + that) // d), then src and slot.

        Window i (tokens i*d .. i*d + l - 1) is completed by the token at i*d + l - 1; among S
        consecutive positions from the length L at most K do, candidate k at offset
        s = (l - 1 - L) mod d + k*d. One past the chunk (s >= S) gets an end so negative that its
        row is -1; so does one whose window would start before token 0. A window's token j sits
        at L + s - (l - 1) + j: among the new inputs (index l + its offset from L in
        ring ++ new) or in the ring (slot t mod l; rubbish before token 0, never written)."""
        l, d = self.block_size, self.block_stride
        K, m = -(-S // d), min(S, l)
        dev = self.device
        r = torch.arange(l, device=dev)[:, None]                              # [l, 1]
        s = (l - 1 - r) % d + d * torch.arange(K, device=dev)                  # [l, K]
        s_in = s.clamp(max=S - 1)
        tok = torch.cat((torch.arange(S, device=dev).expand(l, S), s_in), 1)
        end = torch.where(s < S, s - (l - 1), -(self.capacity + l))
        rel = s_in[..., None] - (l - 1) + torch.arange(l, device=dev)         # [l, K, l]
        src = torch.where(rel >= 0, rel + l, (r[..., None] + rel) % l)
        slot = (r + S - m + torch.arange(m, device=dev)) % l
        return torch.cat((tok, end, src.flatten(1), slot), 1)

    def new_windows(self, idx: StepIndex, k_new: torch.Tensor, v_new: torch.Tensor):
        """The compression windows of the step's candidates (idx = step_index(S)), before the
        step is appended: k_new [B, S, H, D], v_new [B, S, H, Dv] are the new tokens'
        un-rotated compression inputs. Returns wk [B, K, H, l, D], wv [B, K, H, l, Dv] (rubbish
        for candidates whose row is -1), each from the ring where a token is older than the S
        new ones, else from k_new / v_new; laid out as the training forward's windows (views of
        [B, K, l, H, C]), so that phi reduces them in the same order."""
        b = self._batch[:, None, None]

        def gather(ring, new):
            both = torch.cat((ring.to(new.dtype), new), 1)                    # [B, l + S, H, C]
            return both[b, idx.src].transpose(2, 3)                           # [B, K, H, l, C]
        return gather(self.ring_k, k_new), gather(self.ring_v, v_new)

    def append(self, idx: StepIndex, raw, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
               k_in: torch.Tensor, v_in: torch.Tensor) -> None:
        """Appends a step (idx = step_index(S)): the rotated raw keys and values raw = (k, v) or
        (k, v, k_swa, v_swa) [B, S, H, C], the candidates' compressed tokens k_cmp / v_cmp
        [B, K, H, C], the last m un-rotated compression inputs of k_in / v_in [B, S, H, C] into
        the ring; then every sequence is S tokens longer."""
        S, m = k_in.shape[1], idx.slot.shape[1]
        b = self._batch[:, None]
        self.write_raw(b, idx.pos[:, :S], raw)
        self.write_cmp(b, idx.row, k_cmp, v_cmp)
        self.write_ring(b, idx.slot, k_in[:, S - m:], v_in[:, S - m:])
        self.advance(S)

    def advance(self, S: int) -> None:
        """Every sequence got S more tokens."""
        self.seqlens += S
        self.lengths = [n + S for n in self.lengths]
