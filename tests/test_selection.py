"""select_blocks checked by the score rule of docs/design.md section 5 (not by exact indices, which
rounding may legitimately reorder when two block scores are within an ulp): forced blocks
present, ascending, -1 padding only at the end and only when there are fewer than n candidates,
no duplicates, and every chosen free block scores at least as high as every unchosen candidate.
Scores come from reference.block_scores in float64 on the very inputs select_blocks saw."""
import pytest
import torch

import nsa_torch
from helpers import CMP_H, SEL_H, check_selection, hyper, make_inputs, positions
from nsa_torch import reference

# Relative slack of the score comparison, per dtype of the inputs (scores accumulate in float
# for every dtype but float64).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}

CASES = {
    "paper-T1100-G4": dict(T=1100, HQ=4, H=1, D=32),
    "paper-T700-G1-B2": dict(B=2, T=700, HQ=2, H=2, D=16, num_selected=5),
    "l16-T333-G3": dict(T=333, HQ=6, H=2, D=16, block_size=16, block_stride=8, select_size=32,
                        num_selected=4),
    "l'<l-T300-G16": dict(T=300, HQ=16, H=1, D=8, block_size=32, block_stride=8, select_size=16,
                          num_selected=6, num_initial=2, num_local=3),
    "no-forced-T200": dict(T=200, HQ=2, H=1, D=16, block_size=16, block_stride=8,
                           select_size=16, num_selected=3, num_initial=0, num_local=0),
    "all-forced-T260": dict(T=260, HQ=4, H=2, D=16, block_size=16, block_stride=16,
                            select_size=16, num_selected=3, num_initial=1, num_local=2),
    "l'48-T250": dict(T=250, HQ=4, H=2, D=16, select_size=48, num_selected=2, num_local=1),
}

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = [str(d).replace("torch.", "") for d in DTYPES]


def reference_lse(x, case):
    """lse of the compressed branch from the reference in float64, in the dtype our ops use."""
    _, lse = reference.compressed_attention(x["q"].double(), x["k_cmp"].double(),
                                            x["v_cmp"].double(), cu_seqlens=x["cu_seqlens"],
                                            **hyper(case, *CMP_H))
    return lse.to(torch.float64 if x["q"].dtype == torch.float64 else torch.float32)


def select_and_check(x, case, lse, dtype):
    h = dict(hyper(case, *CMP_H), cu_seqlens=x["cu_seqlens"])
    idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, **h, **hyper(case, *SEL_H))
    scores = reference.block_scores(x["q"].double(), x["k_cmp"].double(), lse.double(),
                                    **h, **hyper(case, "select_size"))
    B, T = x["q"].shape[:2]
    check_selection(idx, scores, positions(B, T, x["cu_seqlens"]), case, RTOL[dtype])
    return idx


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_score_rule(case, dtype):
    x = make_inputs(dtype=dtype, seed=21, **case)
    select_and_check(x, case, reference_lse(x, case), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen(dtype):
    case = dict(lengths=[0, 1, 37, 0, 200, 5, 300, 64, 65], HQ=4, H=2, D=16, block_size=16,
                block_stride=8, select_size=32, num_selected=4)
    x = make_inputs(dtype=dtype, seed=22, **case)
    select_and_check(x, case, reference_lse(x, case), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("G", [1, 3])
def test_ties_go_to_the_smaller_block(dtype, G):
    """Identical compressed keys: every visible compressed token gets the same probability, so
    all blocks covered by the same windows tie exactly and the smaller j must win."""
    case = dict(T=400, HQ=2 * G, H=2, D=16, block_size=32, block_stride=16, select_size=32,
                num_selected=5, num_initial=1, num_local=1)
    x = make_inputs(dtype=dtype, seed=23, **case)
    x["k_cmp"] = x["k_cmp"][:, :1].expand_as(x["k_cmp"]).contiguous()
    lse = reference_lse(x, case)
    idx = select_and_check(x, case, lse, dtype)
    scores = reference.block_scores(x["q"].double(), x["k_cmp"].double(), lse.double(),
                                    **hyper(case, *CMP_H, "select_size"))
    assert (scores[..., 1] == scores[..., 2]).any(), "the case has no tie: fix the test"
    ref = reference.select_blocks(x["q"].double(), x["k_cmp"].double(), lse.double(),
                                  **hyper(case, *CMP_H, *SEL_H))
    assert torch.equal(idx, ref)


def test_rows_that_see_nothing():
    """T < block_size: no query sees a compressed token (lse = -inf, every score 0); the free
    slots then go to the smallest candidates."""
    case = dict(T=30, HQ=4, H=2, D=16, block_size=32, block_stride=16, select_size=16,
                num_selected=1, num_initial=0, num_local=0)
    x = make_inputs(dtype=torch.float32, seed=24, **case)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], **hyper(case, *CMP_H))
    assert torch.isinf(lse).all()
    idx = select_and_check(x, case, lse, torch.float32)
    assert (idx[..., 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_lse_minus_inf_rows(dtype):
    """A caller-given lse of -inf means 'sees nothing' (p = 0), never exp(+inf): rows whose whole
    group has lse = -inf select the forced blocks plus the smallest other candidates."""
    case = dict(T=300, HQ=4, H=2, D=16, block_size=16, block_stride=8, select_size=16,
                num_selected=4, num_initial=1, num_local=1)
    x = make_inputs(dtype=dtype, seed=25, **case)
    lse = reference_lse(x, case)
    gen = torch.Generator().manual_seed(26)
    dead_head = torch.rand(lse.shape, generator=gen) < 0.2                  # some heads only
    dead_group = (torch.rand(*lse.shape[:2], 2, generator=gen) < 0.2).repeat_interleave(2, -1)
    lse = lse.masked_fill(dead_head | dead_group, -torch.inf)
    idx = select_and_check(x, case, lse, dtype)
    ref = reference.select_blocks(x["q"].double(), x["k_cmp"].double(), lse.double(),
                                  **hyper(case, *CMP_H, *SEL_H))
    rows = dead_group[..., ::2]                                              # [B, T, H]
    assert torch.equal(idx[rows], ref[rows])


def test_the_checker_rejects_wrong_selections():
    """check_selection itself: a forced block dropped, a free block swapped for a worse one,
    -1 in the middle and a duplicate are each caught."""
    case = CASES["l16-T333-G3"]
    x = make_inputs(dtype=torch.float64, seed=27, **case)
    lse = reference_lse(x, case)
    h = dict(hyper(case, *CMP_H))
    scores = reference.block_scores(x["q"], x["k_cmp"], lse, **h, **hyper(case, "select_size"))
    good = reference.select_blocks(x["q"], x["k_cmp"], lse, **h, **hyper(case, *SEL_H))
    pos = positions(*x["q"].shape[:2], None)
    check_selection(good, scores, pos, case, 0.0)
    t, g = 300, 1  # t // l' = 9: forced 0, 8, 9 and one free slot: row = [0, free, 8, 9]
    row = good[0, t, g].tolist()
    unchosen = [j for j in range(10) if j not in row]
    worst = min(unchosen, key=lambda j: scores[0, t, g, j].item())
    bad_rows = {
        "forced block dropped": sorted([unchosen[0]] + row[1:]),
        "worse free block": sorted([row[0], worst, row[2], row[3]]),
        "-1 in the middle": [row[0], -1, row[2], row[3]],
        "duplicate": [row[0], row[0], row[2], row[3]],
    }
    for what, bad_row in bad_rows.items():
        bad = good.clone()
        bad[0, t, g] = torch.tensor(bad_row)
        try:
            check_selection(bad, scores, pos, case, 0.0)
        except AssertionError:
            continue
        pytest.fail(f"{what} was not caught")
