"""Argument checks of the public functions, raised from Python before any op runs (so they also
fire while torch.compile traces, and name the function the user called). Each public call checks
each argument once: nsa_attention checks everything, then runs the branches' unchecked internals
(functional.py). The C++ ops check their own arguments again for callers of torch.ops.nsa.*:
they are the memory-safety boundary and never trust their caller; they also check what Python
cannot see without a host sync (cu_seqlens values, packed compressed-row counts, block index
values). Messages name the function, the argument, what was expected and what was given."""
import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _desc(t):
    return f"{_dt(t.dtype)} {list(t.shape)} on {t.device}"


# Bounds of the integer hyper-parameters, the C++ ops' (csrc/torch/args.h): sizes fit the kernels'
# int fields (a sequence has fewer than 2^31 tokens), num_selected sizes the [B, T, H, n] output;
# window_size may be anything up to the ops' int64 (beyond the sequence it is the whole past).
MAX_SIZE = 1 << 30
MAX_SELECTED = 1 << 16
_MAX = dict(block_size=MAX_SIZE, block_stride=MAX_SIZE, select_size=MAX_SIZE,
            num_selected=MAX_SELECTED, window_size=(1 << 63) - 1)
_MAX_CAPACITY = (1 << 31) - 1  # tokens of a decoding cache: its lengths are int32


def hyper(fn, **values):
    """Hyper-parameter constraints of docs/design.md section 1, each integer bounded before any sum
    or narrowing."""
    def need(cond, arg, expected):
        if not cond:
            raise ValueError(f"{fn}: {arg} must be {expected}, got {values[arg]}")

    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    for name in ("block_size", "block_stride", "select_size", "window_size", "num_selected"):
        if name in values:
            need(values[name] >= 1, name, "at least 1")
            need(values[name] <= _MAX[name], name, f"at most {_MAX[name]}")
    for name in ("num_initial", "num_local"):
        if name in values:
            need(0 <= values[name] <= values["num_selected"], name, "in [0, num_selected]")
    if "block_size" in values:
        need(values["block_size"] % values["block_stride"] == 0, "block_size",
             f"a multiple of block_stride ({values['block_stride']})")
    if "select_size" in values and "block_stride" in values:
        need(values["select_size"] % values["block_stride"] == 0, "select_size",
             f"a multiple of block_stride ({values['block_stride']})")
    if "num_selected" in values and "num_initial" in values:
        need(values["num_selected"] >= values["num_initial"] + values["num_local"], "num_selected",
             f"at least num_initial + num_local = {values['num_initial'] + values['num_local']}")


def scale(fn, q, value):
    """The softmax scale as a float: D ** -0.5 by default (D >= 1 is checked with q)."""
    if value is None:
        return q.shape[-1] ** -0.5
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{fn}: scale must be a finite number, got {value}")
    return value


def tensor(fn, name, t, dims, expected=None, dtype=None, device=None, contiguous_last=True):
    """t is a tensor of len(dims) dims (named `dims`), sizes `expected` (None = any) and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor {dims}, got {type(t).__name__}")
    def want():
        # Formatted only on failure: under torch.compile the sizes may be symbolic, and turning
        # them into text would break the graph.
        w = f"[{', '.join(dims)}]"
        if expected is not None:
            w += " = [" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        return w

    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {_dt(dtype)} {want()}, got {_desc(t)}")
    ok = t.dim() == len(dims) and (
        expected is None or all(e is None or s == e for s, e in zip(t.shape, expected)))
    if not ok:
        raise ValueError(f"{fn}: {name} must be {want()}, got {_desc(t)}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} must be on {device} (the device of q), got {t.device}")
    # (an empty tensor is read by no kernel)
    if contiguous_last and t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{fn}: {name} must have a contiguous last dim, got strides "
                         f"{list(t.stride())}; call .contiguous() first")


def qkv(fn, q, k, v, k_name="k", v_name="v", same_len=True):
    """q [B, T, HQ, D], k [B, Tk, H, D], v [B, Tk, H, Dv]; one float dtype, one device."""
    tensor(fn, "q", q, ("B", "T", "HQ", "D"))
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: q must be float32, float64, bfloat16 or float16, got {_dt(q.dtype)}")
    B, T, HQ, D = q.shape
    if not isinstance(k, torch.Tensor) or k.dim() != 4:  # its sizes name the others' expectations
        tensor(fn, k_name, k, ("B", "Tk", "H", "D"))
    Tk, H = (T if same_len else k.shape[1]), k.shape[2]
    tensor(fn, k_name, k, ("B", "T" if same_len else "Nc", "H", "D"), (B, Tk, H, D), q.dtype, q.device)
    if v is not None:
        tensor(fn, v_name, v, ("B", "T" if same_len else "Nc", "H", "Dv"), (B, Tk, H, None),
               q.dtype, q.device)
    if HQ < 1:
        raise ValueError(f"{fn}: the number of query heads HQ must be at least 1, got HQ = {HQ}")
    if H < 1 or HQ % H:
        raise ValueError(f"{fn}: the number of query heads HQ = {HQ} must be a multiple of the "
                         f"number of key/value heads H = {H}")
    Dv = None if v is None else v.shape[3]
    if D < 1 or (Dv is not None and Dv < 1):
        raise ValueError(f"{fn}: the head dims must be at least 1, got D = {D}, Dv = {Dv}")
    device_support(fn, q, D, Dv)


# The (D, Dv) pairs with CUDA kernels, from the one list in csrc/nsa/cuda/head_dims.h through the
# compiled module; empty in a build without CUDA kernels (or when _C failed to load).
try:
    from ._C import CUDA_HEAD_DIMS
except ImportError:
    CUDA_HEAD_DIMS = ()


def device_support(fn, q, D, Dv):
    """CPU: every float dtype and head dim. CUDA: bfloat16/float16 and the compiled head dims
    (Dv None: the op reads no values, only D matters), in a build with CUDA kernels. Nothing
    else."""
    if q.device.type == "cpu":
        return
    if q.device.type != "cuda":
        raise NotImplementedError(f"{fn}: nsa_torch has CPU and CUDA kernels; got q on {q.device}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"{fn}: q must be bfloat16 or float16 on CUDA, got {_dt(q.dtype)}")
    if not CUDA_HEAD_DIMS:
        raise NotImplementedError(f"{fn}: this build of nsa_torch has no CUDA kernels (it was built "
                                  f"without nvcc or a CUDA build of torch); got q on {q.device}")
    if Dv is None:
        dims = sorted({d for d, _ in CUDA_HEAD_DIMS})
        if D not in dims:
            raise ValueError(f"{fn}: head dim D must be one of {', '.join(map(str, dims))} on CUDA, "
                             f"got {D}")
    elif (D, Dv) not in CUDA_HEAD_DIMS:
        want = ", ".join(f"({d}, {dv})" for d, dv in CUDA_HEAD_DIMS)
        raise ValueError(f"{fn}: head dims (D, Dv) must be one of {want} on CUDA, got ({D}, {Dv})")


def seqlens(fn, q, cu_seqlens):
    if cu_seqlens is None:
        return
    tensor(fn, "cu_seqlens", cu_seqlens, ("N + 1",), dtype=torch.int32, device=q.device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError(f"{fn}: cu_seqlens must be int32 [N + 1] with N >= 0, got {_desc(cu_seqlens)}")
    if q.shape[0] != 1:
        raise ValueError(f"{fn}: q must be packed with B == 1 when cu_seqlens is given, "
                         f"got B = {q.shape[0]}")


def num_cmp_rows(fn, q, k_cmp, block_size, block_stride, cu_seqlens):
    """Fixed-length batches: k_cmp has Nc(T) rows (packed counts are checked by the op)."""
    if cu_seqlens is not None:
        return
    T = q.shape[1]
    nc = (T - block_size) // block_stride + 1 if T >= block_size else 0
    if k_cmp.shape[1] != nc:
        raise ValueError(
            f"{fn}: k_cmp must be [B, Nc, H, D] with Nc = (T - block_size) // block_stride + 1 = "
            f"{nc} compressed tokens for T = {T} (0 when T < block_size), got {k_cmp.shape[1]} rows")


def gate(fn, name, g, q):
    B, T, HQ, _ = q.shape
    tensor(fn, name, g, ("B", "T", "HQ"), (B, T, HQ), device=q.device, contiguous_last=False)
    if not g.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a float tensor [B, T, HQ], got {_desc(g)}")


def decode(fn, q, k_cache, v_cache, k_swa_cache, v_swa_cache, k_cmp_cache, v_cmp_cache, gates,
           cache_seqlens, block_table, *, block_size, block_stride, select_size):
    """The tensors of a decoding step (hyper-parameters checked by hyper() first), as the op
    checks them (csrc/torch/decode_op.cpp): q [B, S, HQ, D]; raw caches contiguous
    [B, capacity, H, D|Dv], or page pools [num_pages, page_size, H, D|Dv] with block_table int32
    [B, max_pages] and page_size a multiple of select_size; the window branch's caches both or
    neither, laid out as k_cache/v_cache; compressed caches [B, cmp_capacity, H, D|Dv] with
    cmp_capacity >= Nc(capacity); gates [B, S, HQ]; cache_seqlens int32 [B]. One float dtype,
    one device. The lengths' values live on the device and are the op's to check."""
    tensor(fn, "q", q, ("B", "S", "HQ", "D"))
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: q must be float32, float64, bfloat16 or float16, "
                        f"got {_dt(q.dtype)}")
    B, S, HQ, D = q.shape
    paged = block_table is not None
    raw = ("num_pages", "page_size", "H") if paged else ("B", "capacity", "H")
    for name, t, dim in (("k_cache", k_cache, "D"), ("v_cache", v_cache, "Dv")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:  # the sizes below read its dims
            tensor(fn, name, t, raw + (dim,))
    capacity = k_cache.shape[1]
    shown = capacity
    if paged:
        tensor(fn, "block_table", block_table, ("B", "max_pages"), (B, None), torch.int32, q.device)
        capacity = block_table.shape[1] * k_cache.shape[1]
        shown = f"max_pages * page_size = {block_table.shape[1]} * {k_cache.shape[1]}"
    if capacity > _MAX_CAPACITY:
        raise ValueError(f"{fn}: the cache capacity must be at most 2^31 - 1 tokens (int32 "
                         f"cache_seqlens), got {shown}")
    first = (k_cache.shape[0] if paged else B, k_cache.shape[1], k_cache.shape[2])
    tensor(fn, "k_cache", k_cache, raw + ("D",), first + (D,), q.dtype, q.device)
    tensor(fn, "v_cache", v_cache, raw + ("Dv",), first + (None,), q.dtype, q.device)
    H, Dv = k_cache.shape[2], v_cache.shape[3]
    if (k_swa_cache is None) != (v_swa_cache is None):
        given, missing = ("k_swa_cache", "v_swa_cache")[::1 if v_swa_cache is None else -1]
        raise ValueError(f"{fn}: {missing} must be given with {given} (the window branch's own "
                         "keys and values, or neither), got None")
    if k_swa_cache is not None:
        tensor(fn, "k_swa_cache", k_swa_cache, raw + ("D",), first + (D,), q.dtype, q.device)
        tensor(fn, "v_swa_cache", v_swa_cache, raw + ("Dv",), first + (Dv,), q.dtype, q.device)
    if HQ < 1:
        raise ValueError(f"{fn}: the number of query heads HQ must be at least 1, got HQ = {HQ}")
    if H < 1 or HQ % H:
        raise ValueError(f"{fn}: the number of query heads HQ = {HQ} must be a multiple of the "
                         f"number of key/value heads H = {H}")
    if D < 1 or Dv < 1:
        raise ValueError(f"{fn}: the head dims must be at least 1, got D = {D}, Dv = {Dv}")
    tensor(fn, "k_cmp_cache", k_cmp_cache, ("B", "cmp_capacity", "H", "D"), (B, None, H, D),
           q.dtype, q.device)
    tensor(fn, "v_cmp_cache", v_cmp_cache, ("B", "cmp_capacity", "H", "Dv"),
           (B, k_cmp_cache.shape[1], H, Dv), q.dtype, q.device)
    for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates):
        tensor(fn, name, g, ("B", "S", "HQ"), (B, S, HQ), q.dtype, q.device, contiguous_last=False)
    tensor(fn, "cache_seqlens", cache_seqlens, ("B",), (B,), torch.int32, q.device,
           contiguous_last=False)
    if paged and k_cache.shape[1] % select_size:
        raise ValueError(f"{fn}: k_cache must be a pool of pages of a multiple of select_size = "
                         f"{select_size} tokens (a selection block never straddles two pages), "
                         f"got page_size = {k_cache.shape[1]}")
    if S > capacity:
        raise ValueError(f"{fn}: q must be [B, S, HQ, D] with at most capacity = {capacity} new "
                         f"tokens, got S = {S}")
    nc = (capacity - block_size) // block_stride + 1 if capacity >= block_size else 0
    if k_cmp_cache.shape[1] < nc:
        raise ValueError(f"{fn}: k_cmp_cache must be [B, cmp_capacity, H, D] with cmp_capacity >= "
                         f"Nc(capacity) = {nc} compressed tokens for capacity = {capacity}, got "
                         f"{k_cmp_cache.shape[1]} rows")
    device_support(fn, q, D, Dv)
