"""Non-contiguous and misaligned inputs on CUDA: q, k, v sliced from a packed qkv projection,
gates and compressed keys as views of wider tensors, a non-contiguous upstream gradient, and
pointers or strides that break 16-byte alignment. Same results as contiguous inputs."""
import pytest
import torch

from helpers import (CUSTOM_HYPER, LOW_PRECISION, dtype_name, gpu_inputs, rand_like, run_branch,
                     seed_of, strided_copy, with_indices)

pytestmark = pytest.mark.cuda


def packed_qkv(x, seed):
    """q, k, v as views of one packed [B, T, HQ*D + H*D + H*Dv + 8] projection output (the usual
    fused qkv linear), gates as views of one [B, T, 3, HQ] tensor, k_cmp/v_cmp and block_indices
    as slices of wider tensors: every tensor non-contiguous, last dim contiguous."""
    q, k, v = x["q"], x["k"], x["v"]
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[3]
    W = HQ * D + H * D + H * Dv + 8
    packed = rand_like(torch.empty(B, T, W, dtype=q.dtype, device=q.device), seed)
    out = dict(x)
    a = 0
    for n, heads, dim in (("q", HQ, D), ("k", H, D), ("v", H, Dv)):
        view = packed[..., a:a + heads * dim].view(B, T, heads, dim)
        view.copy_(x[n])
        out[n] = view
        a += heads * dim
    gates = rand_like(torch.empty(B, T, 3, HQ, dtype=x["g_cmp"].dtype, device=q.device), seed + 1)
    for i, n in enumerate(("g_cmp", "g_slc", "g_swa")):
        gates[:, :, i].copy_(x[n])
        out[n] = gates[:, :, i]
    for i, n in enumerate(("k_cmp", "v_cmp")):
        out[n] = strided_copy(x[n], seed + 2 + i)
    if "block_indices" in x:
        bi = x["block_indices"]
        wide = torch.full((*bi.shape[:-1], bi.shape[-1] + 4), -1, dtype=torch.int32,
                          device=bi.device)
        wide[..., :bi.shape[-1]] = bi
        out["block_indices"] = wide[..., :bi.shape[-1]]
    for n in ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp"):
        assert not out[n].is_contiguous() and out[n].stride(-1) == 1, n
    return out


STRIDED_CASE = dict(B=2, T=300, HQ=8, H=2, D=128, Dv=64, **CUSTOM_HYPER)


@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding", "nsa"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)
def test_strided_inputs(branch, dtype):
    """Non-contiguous inputs (q, k, v sliced from a packed qkv tensor) and a non-contiguous
    upstream gradient."""
    case = STRIDED_CASE
    x = gpu_inputs(dtype=dtype, seed=seed_of("strided", branch, dtype), **case)
    if branch == "selected":
        x = with_indices(x, case, "user", seed=5)
    x = packed_qkv(x, seed_of("strided-pack", branch, dtype))
    run_branch(branch, x, case, dtype, strided_dout=True)


def misaligned_qkv(x, seed):
    """q, k, v as views of one packed buffer starting 1 element (2 bytes) into its storage, with
    an odd row stride: neither the pointers nor the strides are multiples of 16 bytes, which the
    kernels' 16-byte copies need (the ops copy such inputs first)."""
    q, k, v = x["q"], x["k"], x["v"]
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[3]
    W = HQ * D + H * D + H * Dv + 1
    flat = rand_like(torch.empty(B * T * W + 1, dtype=q.dtype, device=q.device), seed)
    packed = flat[1:].view(B, T, W)
    out = dict(x)
    a = 0
    for n, heads, dim in (("q", HQ, D), ("k", H, D), ("v", H, Dv)):
        view = packed[..., a:a + heads * dim].view(B, T, heads, dim)
        view.copy_(x[n])
        assert view.data_ptr() % 16 or view.stride(1) % 8, n
        out[n] = view
        a += heads * dim
    return out


@pytest.mark.parametrize("branch", ["compressed", "selected", "sliding", "select", "nsa"])
def test_misaligned_inputs(branch):
    """Inputs whose pointers and strides break 16-byte alignment give the same results."""
    case, dtype = STRIDED_CASE, torch.bfloat16
    x = gpu_inputs(dtype=dtype, seed=seed_of("misaligned", branch), **case)
    if branch == "selected":
        x = with_indices(x, case, "user", seed=5)
    run_branch(branch, misaligned_qkv(x, seed_of("misaligned-pack", branch)), case, dtype)
