"""Private hooks into the CUDA kernel choice, for A/B comparisons and tests (not a public API).

Each CUDA op call runs the kernels of a plan: a pure function of the shape, the GPU (architecture,
SM count) and the overrides set here (csrc/nsa/plan.h). ``force`` overrides choices, ``plans``
records the plans that ran::

    from nsa_torch import _debug
    with _debug.force(fwd="wide", bwd="mma", slc_fwd="blocks", slc_dq="tokens", select="mma",
                      split_tokens=64, slc_chunk_rows=100):   # any subset of these keywords
        ...
    with _debug.plans() as ran:
        o = nsa_torch.nsa_attention(...)
    # ran: one dict per CUDA op call, in call order, e.g.
    # {"op": "nsa.compressed_attention_fwd", "fwd": "wgmma", "arch": 90, "num_sms": 132}
    # {"op": "nsa.selected_attention_bwd", "slc_dq": "blocks", "slc_chunk_rows": 4096,
    #  "bwd": "wgmma", "split_tokens": 4096, "split": 4, "arch": 90, "num_sms": 132}
    # {"op": "nsa.select_blocks", "select": "wgmma", "arch": 90, "num_sms": 132}

Keys and values (``keys()`` lists them):
  fwd             "wgmma" (sm_90, D, Dv in {64, 128}), "wide" (mma.sync, 32 rows per warp, D, Dv <= 128)
                  or "mma" (mma.sync, 16 rows per warp): forward of the compressed and window branches
  bwd             "wgmma" (sm_90, D, Dv in {64, 128}) or "mma": dQ and dK/dV of every branch
  slc_fwd         "warp" (per-warp kernels, G < 64), "union" (block union, any G) or "blocks" (by key
                  blocks, sm_90, D, Dv in {64, 128}, select_size in [32, 256]): the selected forward.
                  "warp" and "union" also choose the selected dQ's kernel when it runs by tokens
                  (a backward plan reports it as "slc_tokens")
  slc_dq          "tokens" or "blocks" (as slc_fwd's): the selected branch's dQ
  select          "wgmma" (sm_90, D in {64, 128}, G in {16, 32}) or "mma": select_blocks
  split_tokens    int >= 0: tokens per dK/dV split range (0: no split; default 4096)
  slc_chunk_rows  int >= 1: rows per chunk of the selected branch by blocks (default: as many as
                  fit the partials' memory bound)
  cmp_splits      int >= 1: thread blocks per (sequence, KV head) of decode_attention's scan of
                  the compressed tokens
  slc_splits      int >= 1: the same for its selected and window keys
  sel_splits      int in [1, 64]: thread blocks per (query, KV head) of decode_attention's top-n
                  selection over the candidate blocks
  window_order    "after_scan", "before_scan" or "after_select": where decode_attention launches
                  its window kernel
  scan_order      "together" or "keys_first": decode_attention's compressed scan streams each key
                  tile with its value tile, or a split's key tiles first (the selection starts
                  after them), then its value tiles
  dep_wait        "grid" or "head": what decode_attention's selection, selected branch and merge
                  wait for, the whole kernel before them or their own (sequence, KV head)'s part of it
A value of None removes the key's override (the plan's own choice, also inside an outer force).

An unknown key or value raises ValueError when ``force`` is called. Forcing a kernel that the
shape or GPU cannot take raises ValueError at the op call, naming the key, the value and why:
never a silent fallback. Overrides nest and are restored on exit; they are process-global state
for eager debugging and tests (every thread sees them), not for use under torch.compile. CPU op
calls have no plan: they are neither affected nor recorded.
"""
import threading

from . import _C

_lock = threading.Lock()
_in_force = [{}]  # the overrides of each open force, outermost first ({} when none is open)


def keys():
    """{key: tuple of kernel names} (an empty tuple for the int keys)."""
    return _C._debug_keys()


class force:
    """Context manager overriding the kernel choice of CUDA op calls (see the module docstring)."""

    def __init__(self, **choices):
        self._choices = choices
        _C._debug_force(self._merged(choices, {}), False)  # validates: ValueError for a bad key or value
        self._saved = None

    @staticmethod
    def _merged(choices, outer):
        merged = {**outer, **choices}
        return {k: v for k, v in merged.items() if v is not None}

    def __enter__(self):
        with _lock:
            merged = self._merged(self._choices, _in_force[-1])
            _C._debug_force(merged, True)
            _in_force.append(merged)
            self._saved = len(_in_force) - 1
        return self

    def __exit__(self, *exc):
        with _lock:
            del _in_force[self._saved:]
            _C._debug_force(_in_force[-1], True)
        return False


class _Plans(list):
    """The plans recorded since the recording opened; read live from the log while it is open."""

    def __init__(self, start):
        super().__init__()
        self._start = start
        self._open = True

    def _sync(self):
        if self._open:
            self.extend(_C._debug_plans_read(self._start + super().__len__()))

    def __len__(self):
        self._sync()
        return super().__len__()

    def __iter__(self):
        self._sync()
        return super().__iter__()

    def __getitem__(self, i):
        self._sync()
        return super().__getitem__(i)

    def __contains__(self, item):
        self._sync()
        return super().__contains__(item)

    def __eq__(self, other):
        self._sync()
        return list(super().__iter__()) == other

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        self._sync()
        return super().__repr__()


class plans:
    """Context manager recording the plan of every CUDA op call inside it: ``as ran`` gives a list
    of dicts, one per op call in call order (live while open, fixed on exit). Recordings nest."""

    def __enter__(self):
        self._ran = _Plans(_C._debug_plans_open())
        return self._ran

    def __exit__(self, *exc):
        try:
            self._ran._sync()
        finally:
            self._ran._open = False
            _C._debug_plans_close()
        return False


# decode_attention's kernels (in launch order but for the window's, after the scan's, before it or
# after the selection's: the plan's window_order) and trace events, as
# csrc/nsa/cuda/decode/trace.cuh numbers them.
TRACE_KERNELS = ("window", "scan", "select", "sparse", "combine")
TRACE_EVENTS = ("start", "waited", "step1", "step2", "mid", "end")


class decode_trace:
    """Context manager tracing the phases of decode_attention's CUDA kernels: while it is open,
    thread 0 of each thread block stores the GPU's global timer (ns) when a phase ends, into
    ``as buf`` (an int64 CUDA tensor [5 kernels, blocks, 6 events], zero where nothing was stored;
    the grid's first ``blocks`` thread blocks of each kernel). A later step overwrites an earlier
    one's stamps, so after the steps of interest (or CUDA-graph replays captured inside the
    context) the buffer holds the last one. Events (TRACE_EVENTS: start, waited, step1, step2,
    mid, end; each kernel stores start and end): window: past its wait (at its end; after its
    count when launched after the selection), first key tile landed, -, -; scan: -, first key
    tile landed, key tiles done and counted (scan_order keys_first), key loop done (its end comes
    after its wait, for the window when launched before it);
    select: past the wait for the scan, lse done, candidates ranked, list published and counted;
    sparse: past the wait for the selection, first key tile landed, union of chosen blocks built,
    -; combine: past its last wait (for the selection and sparse kernels), past its wait for the
    scan and window, -, splits merged. ``trace_summary`` reads it.
    Process-global state for profiling (tools/profile_decode.py --trace), not for use under
    torch.compile; the buffer must outlive every graph captured with it."""

    def __init__(self, blocks=4096, device=None):
        import torch
        if not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"nsa_torch._debug.decode_trace: blocks must be an int >= 1, got {blocks!r}")
        if not torch.cuda.is_available():
            raise RuntimeError("nsa_torch._debug.decode_trace: needs a CUDA device")
        self.buffer = torch.zeros(len(TRACE_KERNELS), blocks, len(TRACE_EVENTS), dtype=torch.int64,
                                  device=device if device is not None else "cuda")

    def __enter__(self):
        _C._debug_decode_trace(self.buffer.data_ptr(), self.buffer.shape[1])
        return self.buffer

    def __exit__(self, *exc):
        _C._debug_decode_trace(0, 0)
        return False


def trace_summary(buffer):
    """{kernel: {event: (min, median, max) in us after the step's first block start, over the
    thread blocks that stored it}} of a decode_trace buffer (events nobody stored are left out)."""
    t = buffer.detach().cpu()
    starts = t[:, :, 0]
    starts = starts[starts != 0]
    if starts.numel() == 0:
        raise ValueError("nsa_torch._debug.trace_summary: no kernel stored a start (no traced step ran)")
    t0 = int(starts.min())
    out = {}
    for k, kernel in enumerate(TRACE_KERNELS):
        row = {}
        for e, event in enumerate(TRACE_EVENTS):
            v = t[k, :, e]
            v = v[v != 0]
            if v.numel():
                us = (v - t0).double() / 1e3
                row[event] = (float(us.min()), float(us.median()), float(us.max()))
        out[kernel] = row
    return out
