"""The kernel variants on CUDA, each forced through nsa_torch._debug and checked to have run
(helpers.kernels), against the float64 reference: the compressed and window forward ("mma",
"wide"), the mma.sync backward ("mma", with split dK/dV), and the selected branch's forward
(by blocks or by tokens: per-warp below G = 64, else the block union) and dQ (by blocks or by
tokens). Where the shape cannot take the forced kernel the call must be refused (ValueError);
on a GPU that cannot run it, the test fails.

The selected branch's kernels by blocks run in chunks of 100 rows (slc_chunk_rows), so that the
chunking of the partials and the split of the lead blocks run on short sequences too."""
import pytest
import torch

from helpers import (CASES, VARLEN, case_params, check_branch, check_raw_lse, compressed,
                     gpu_inputs, hyper, kernels, num_cmp, run_branch, seed_of, selected, sliding,
                     slc_by_tokens, with_indices)

pytestmark = pytest.mark.cuda

SMALL_CHUNKS = 100  # rows per chunk of the selected branch by blocks

# fwd: "mma" (mma.sync, 16 rows per warp; the one for D > 128) in bf16, "wide" (mma.sync, 32 rows
# per warp) in both dtypes. The default on sm_90, "wgmma", runs in test_cuda_branches.py.
FWD_KIND_PARAMS = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}")
                   for kind in ("mma", "wide")
                   for p in case_params(CASES) if p.values[1] == torch.bfloat16 or kind != "mma"]


@pytest.mark.parametrize("case,dtype,kind", FWD_KIND_PARAMS)
def test_forward_kernel_kinds(case, dtype, kind):
    """The forward kernels of the compressed and window branches that sm_90 does not run by
    default for D, Dv <= 128."""
    with kernels(case, fwd=kind):
        x = gpu_inputs(dtype=dtype, seed=seed_of("cmp", case, dtype), **case)
        check_branch(compressed, x, case, ["q", "k_cmp", "v_cmp"], dtype)
        x = gpu_inputs(dtype=dtype, seed=seed_of("swa", case, dtype), **case)
        check_branch(sliding, x, case, ["q", "k", "v"], dtype)


@pytest.mark.parametrize("branch", ["compressed", "sliding", "selected"])
@pytest.mark.parametrize("case,dtype", case_params(CASES))
def test_mma_backward(case, dtype, branch):
    """bwd="mma": the mma.sync dQ and dK/dV kernels (the one for D > 128; sm_90 otherwise runs
    their warpgroup twins) against float64, split dK/dV (ranges of 64 tokens) included."""
    launches = branch != "compressed" or num_cmp(case["T"], **hyper(case, "block_size",
                                                                    "block_stride")) > 0
    with kernels(case, launches=launches, bwd="mma", split_tokens=64):
        x = gpu_inputs(dtype=dtype, seed=seed_of("mma-dkdv", case, dtype, branch), **case)
        run_branch(branch, x, case, dtype, seed=seed_of("mma-dkdv-idx", case, branch))


# The selected branch's forward by blocks (sm_90, D, Dv <= 128, 32 <= select_size <= 256: the
# default for G < 16) and by tokens, on CASES and two more select sizes.
SLC_FWD_CASES = dict(CASES, **{
    "T600-G4-d128-s128": dict(T=600, HQ=8, H=2, D=128, Dv=128, select_size=128, num_selected=4),
    "T500-B2-G2-d64-s96": dict(B=2, T=500, HQ=4, H=2, D=64, Dv=64, select_size=96, num_selected=3,
                               num_local=1),
})
SLC_KINDS = ["blocks", "tokens"]


def slc_fwd_kind(case, kind):
    return "blocks" if kind == "blocks" else slc_by_tokens(case)


@pytest.mark.parametrize("kind", SLC_KINDS)
@pytest.mark.parametrize("case,dtype", case_params(SLC_FWD_CASES))
def test_selected_forward_kinds(case, dtype, kind):
    with kernels(case, slc_fwd=slc_fwd_kind(case, kind), slc_chunk_rows=SMALL_CHUNKS):
        x = gpu_inputs(dtype=dtype, seed=seed_of("slc-fwd", case, dtype, kind), **case)
        for idx_kind in ("user", "selected"):
            xi = with_indices(x, case, idx_kind, seed=seed_of("slc-fwd-idx", case, idx_kind))
            (o,) = check_branch(selected, xi, case, ["q", "k", "v"], dtype)
            check_raw_lse("slc", xi, case, o)


@pytest.mark.parametrize("kind", SLC_KINDS)
@pytest.mark.parametrize("case,dtype", case_params(SLC_FWD_CASES))
def test_selected_dq_kinds(case, dtype, kind):
    """slc_dq: the selected branch's dQ by blocks (per-(row, slot) bf16 partials of the key
    tiles, summed in slot order; the default on sm_90 for G < 16) or by tokens."""
    with kernels(case, slc_dq=kind, slc_chunk_rows=SMALL_CHUNKS):
        x = gpu_inputs(dtype=dtype, seed=seed_of("slc-dq", case, dtype, kind), **case)
        for idx_kind in ("user", "selected"):
            xi = with_indices(x, case, idx_kind, seed=seed_of("slc-dq-idx", case, idx_kind))
            check_branch(selected, xi, case, ["q", "k", "v"], dtype)


@pytest.mark.parametrize("kind", SLC_KINDS)
@pytest.mark.parametrize("part", ["fwd", "dq"])
@pytest.mark.parametrize("case", VARLEN.values(), ids=list(VARLEN))
def test_selected_kinds_varlen(case, part, kind):
    """The selected branch's forward or dQ by blocks or by tokens on packed batches."""
    force = {"slc_fwd": slc_fwd_kind(case, kind)} if part == "fwd" else {"slc_dq": kind}
    with kernels(case, slc_chunk_rows=SMALL_CHUNKS, **force):
        x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of(f"slc-{part}-varlen", case, kind),
                       **case)
        run_branch("selected", x, case, torch.bfloat16,
                   seed=seed_of(f"slc-{part}-varlen-idx", case))
