"""Tiny CUDA problems for compute-sanitizer (memcheck, racecheck; benchmarks/gpu_check.sh runs
`pytest -k sanitize`): every branch forward and backward plus select_blocks, both dtypes, and the
kernel variants with the most index arithmetic (split dK/dV, the selected branch by blocks in
chunks, the warpgroup selection, the warpgroup forward over many key tiles). The float64
reference runs on the CPU so that the GPU work is (almost) only our kernels."""
import pytest
import torch

from helpers import (CUSTOM_HYPER, LOW_PRECISION, assert_split, dtype_name, gpu_inputs, kernels,
                     run_branch, seed_of, with_indices)

pytestmark = pytest.mark.cuda

SANITIZE_HEADS = {1: dict(HQ=2, H=2, D=128, Dv=128), 3: dict(HQ=6, H=2, D=64, Dv=128),
                  16: dict(HQ=16, H=1, D=192, Dv=128)}
SANITIZE = [pytest.param(dict(T=T, **SANITIZE_HEADS[G], **(CUSTOM_HYPER if T == 300 else {})),
                         dtype, id=f"T{T}-G{G}-{dtype_name(dtype)}")
            for T in (100, 300) for G in (1, 3, 16) for dtype in LOW_PRECISION]


@pytest.mark.parametrize("case,dtype", SANITIZE)
def test_sanitize_branches(case, dtype):
    x = gpu_inputs(dtype=dtype, seed=seed_of("sanitize", case, dtype), **case)
    for branch in ("compressed", "selected", "sliding", "select", "nsa"):
        run_branch(branch, x, case, dtype, ref_device="cpu")
    run_branch("selected", with_indices(x, case, "selected", ref_device="cpu"), case, dtype,
               ref_device="cpu")


def test_sanitize_split():
    """Split dK/dV, and the selected branch's dQ by blocks (at every G) in chunks of 70 rows."""
    case = dict(T=300, **SANITIZE_HEADS[3])
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-split"), **case)
    with kernels(case, split_tokens=64, slc_chunk_rows=70, slc_dq="blocks") as ran:
        for branch in ("compressed", "selected", "nsa"):
            run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")
    assert_split(ran)


@pytest.mark.parametrize("dims", [(96, 96), (256, 256)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_sanitize_head_dims(dims):
    """The mma.sync-only head dims, every branch and select_blocks with split dK/dV: rows of 12
    chunks (D = 96, also in the selection's resident units) and dK, dV in two passes whose split
    partials share one buffer (D = 256)."""
    case = dict(T=300, HQ=8, H=2, D=dims[0], Dv=dims[1], **CUSTOM_HYPER)
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-dims", *dims), **case)
    with kernels(case, split_tokens=64) as ran:
        for branch in ("compressed", "selected", "sliding", "select", "nsa"):
            run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")
    assert_split(ran)


def test_sanitize_split_heavy_tiles():
    """The selected branch's forward and dQ by blocks with every key tile split by the tokens
    that chose it: G = 16 and chunks of 100 rows give 3 splits, and at T = 300 with 16 blocks
    chosen each of the 5 blocks is chosen by every later token."""
    case = dict(T=300, HQ=16, H=1, D=128, Dv=128)
    with kernels(case, slc_chunk_rows=100, slc_fwd="blocks", slc_dq="blocks"):
        x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-slc-heavy"), **case)
        run_branch("selected", with_indices(x, case, "selected", ref_device="cpu"), case,
                   torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("T", [100, 1200], ids=lambda T: f"T{T}")
def test_sanitize_select(T):
    """The warpgroup selection kernel (sm_90; G = 16, D = 128 and G = 32, D = 64): one key tile
    (racecheck's) and several."""
    for heads, hyper_ in ((dict(HQ=16, H=1, D=128, Dv=128), {}),
                          (dict(HQ=32, H=1, D=64, Dv=64), CUSTOM_HYPER)):
        case = dict(T=T, **heads, **hyper_)
        x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-select", T, heads["HQ"]),
                       **case)
        with kernels(case, select="wgmma"):
            run_branch("select", x, case, torch.bfloat16, ref_device="cpu")


@pytest.mark.parametrize("dims", [(128, 128), (64, 64)], ids=lambda d: f"d{d[0]}v{d[1]}")
def test_sanitize_forward_tiles(dims):
    """The default warpgroup forward (sm_90) over enough key tiles to cycle its stages several
    times: the window branch sees up to 10 tiles per block of 64 rows, the compressed up to 5
    (Nc = 261)."""
    case = dict(T=4200, HQ=2, H=2, D=dims[0], Dv=dims[1])
    x = gpu_inputs(dtype=torch.bfloat16, seed=seed_of("sanitize-tiles", *dims), **case)
    for branch in ("compressed", "sliding"):
        run_branch(branch, x, case, torch.bfloat16, ref_device="cpu")


def test_sanitize_varlen():
    case = dict(lengths=[0, 1, 37, 0, 130, 5, 64, 65], HQ=6, H=2, D=64, Dv=64, **CUSTOM_HYPER)
    for dtype in LOW_PRECISION:
        x = gpu_inputs(dtype=dtype, seed=seed_of("sanitize-varlen", dtype), **case)
        for branch in ("compressed", "selected", "sliding", "select", "nsa"):
            run_branch(branch, x, case, dtype, ref_device="cpu")
