"""Tests of nsa_torch.reference against per-token loops written from docs/design.md section 1.

The loops below are deliberately naive (one query token and head at a time, Python lists of
visible keys, sorting for top-n) so that they can be checked by reading them against the
design. Everything runs in float64 on the CPU.
"""

import math

import pytest
import torch

from nsa_torch import reference as ref

F64 = torch.float64


def randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def make_gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Per-token loops (the design, literally). Inputs are one sequence: q [T, HQ, D], k [S, H, D].


def loop_attention(q, k, v, visible_keys, scale):
    """visible_keys(t, h) -> list of key rows; returns o [T, HQ, Dv], lse [T, HQ]."""
    T, HQ, _ = q.shape
    H, Dv = k.shape[1], v.shape[2]
    G = HQ // H
    o = torch.zeros(T, HQ, Dv, dtype=F64)
    lse = torch.full((T, HQ), -math.inf, dtype=F64)
    for t in range(T):
        for h in range(HQ):
            keys = visible_keys(t, h)
            if not keys:
                continue
            logits = torch.stack([scale * torch.dot(q[t, h], k[s, h // G]) for s in keys])
            m = logits.max()
            lse[t, h] = m + torch.log(torch.exp(logits - m).sum())
            p = torch.exp(logits - lse[t, h])
            o[t, h] = sum(p[i] * v[s, h // G] for i, s in enumerate(keys))
    return o, lse


def loop_compressed(q, k_cmp, v_cmp, l, d, scale):
    def keys(t, h):
        return [i for i in range(k_cmp.shape[0]) if i * d + l - 1 <= t]
    return loop_attention(q, k_cmp, v_cmp, keys, scale)


def loop_sliding(q, k, v, w, scale):
    return loop_attention(q, k, v, lambda t, h: list(range(max(0, t - w + 1), t + 1)), scale)


def loop_selected(q, k, v, block_indices, lp, scale):
    G = q.shape[1] // k.shape[1]

    def keys(t, h):
        blocks = {int(j) for j in block_indices[t, h // G] if j >= 0}
        return [s for s in range(t + 1) if s // lp in blocks]
    return loop_attention(q, k, v, keys, scale)


def loop_block_scores(q, k_cmp, lse, l, d, lp, scale):
    """S [T, H, NB] by the overlap formula, -inf for j > t // l'."""
    T, HQ, _ = q.shape
    Nc, H, _ = k_cmp.shape
    G = HQ // H
    NB = (T + lp - 1) // lp
    S = torch.full((T, H, NB), -math.inf, dtype=F64)
    for t in range(T):
        for g in range(H):
            for j in range(t // lp + 1):
                total = 0.0
                for h in range(g * G, (g + 1) * G):
                    for i in range(Nc):
                        if i * d + l - 1 > t:
                            continue
                        p = math.exp(scale * float(torch.dot(q[t, h], k_cmp[i, g])) - float(lse[t, h]))
                        overlap = min(i * d + l - 1, (j + 1) * lp - 1) - max(i * d, j * lp) + 1
                        total += p * max(overlap, 0) / d
                S[t, g, j] = total
    return S


def loop_select(S, lp, n, n_init, n_local):
    """Top-n by sorting, from S [T, H, NB]: int [T, H, n]."""
    T, H, _ = S.shape
    out = torch.full((T, H, n), -1, dtype=torch.int32)
    for t in range(T):
        b = t // lp
        for g in range(H):
            forced = [j for j in range(b + 1) if j < n_init or b - n_local < j <= b]
            others = [j for j in range(b + 1) if j not in forced]
            others.sort(key=lambda j: (-float(S[t, g, j]), j))  # best score first, then smaller j
            chosen = sorted(forced + others[: n - len(forced)])
            out[t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def random_block_indices(gen, T, H, n, lp):
    """Random sequence-relative blocks: for each (t, g) a random subset of 0 .. t // lp,
    ascending, -1 padded (blocks after t's own are allowed by the API and see no key)."""
    NB = (T + lp - 1) // lp
    out = torch.full((T, H, n), -1, dtype=torch.int32)
    for t in range(T):
        for g in range(H):
            count = int(torch.randint(0, min(n, NB) + 1, (1,), generator=gen))
            blocks = torch.randperm(NB, generator=gen)[:count].sort().values
            out[t, g, :count] = blocks.to(torch.int32)
    return out


def assert_close(actual, expected, tol=1e-12):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any()
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite)
    assert torch.equal(actual[~finite], expected[~finite])
    torch.testing.assert_close(actual[finite], expected[finite], rtol=tol, atol=tol)


SHAPES = [  # (T, H, G, D, Dv)
    (1, 2, 1, 8, 6),
    (5, 1, 3, 5, 7),
    (31, 2, 2, 8, 6),
    (32, 1, 1, 4, 9),
    (33, 2, 3, 8, 6),
    (65, 1, 2, 6, 5),
    (130, 2, 1, 5, 3),
]
CMP_SIZES = [(16, 8), (32, 16)]  # (block_size, block_stride)


# ----------------------------------------------------------------------------------------------
# Branches against the loops


@pytest.mark.parametrize("T,H,G,D,Dv", SHAPES)
@pytest.mark.parametrize("l,d", CMP_SIZES)
def test_compressed_matches_loops(T, H, G, D, Dv, l, d):
    gen = make_gen(T * 100 + G)
    Nc = ref.num_cmp_tokens(T, l, d)
    q, k_cmp, v_cmp = randn(gen, 2, T, H * G, D), randn(gen, 2, Nc, H, D), randn(gen, 2, Nc, H, Dv)
    o, lse = ref.compressed_attention(q, k_cmp, v_cmp, block_size=l, block_stride=d, scale=0.7)
    assert o.dtype == F64 and lse.dtype == F64 and lse.shape == (2, T, H * G)
    for b in range(2):
        o_loop, lse_loop = loop_compressed(q[b], k_cmp[b], v_cmp[b], l, d, 0.7)
        assert_close(o[b], o_loop)
        assert_close(lse[b], lse_loop)


@pytest.mark.parametrize("T,H,G,D,Dv", SHAPES)
@pytest.mark.parametrize("w", [1, 7, 512])
def test_sliding_window_matches_loops(T, H, G, D, Dv, w):
    gen = make_gen(T * 100 + G + w)
    q, k, v = randn(gen, 1, T, H * G, D), randn(gen, 1, T, H, D), randn(gen, 1, T, H, Dv)
    o = ref.sliding_window_attention(q, k, v, window_size=w)
    assert_close(o[0], loop_sliding(q[0], k[0], v[0], w, D ** -0.5)[0])


@pytest.mark.parametrize("T,H,G,D,Dv", SHAPES)
@pytest.mark.parametrize("lp,n", [(16, 3), (32, 2), (64, 16)])
def test_selected_matches_loops(T, H, G, D, Dv, lp, n):
    gen = make_gen(T * 100 + G + lp)
    q, k, v = randn(gen, 1, T, H * G, D), randn(gen, 1, T, H, D), randn(gen, 1, T, H, Dv)
    block_indices = random_block_indices(gen, T, H, n, lp)[None]
    o = ref.selected_attention(q, k, v, block_indices, select_size=lp, scale=0.3)
    assert_close(o[0], loop_selected(q[0], k[0], v[0], block_indices[0], lp, 0.3)[0])


@pytest.mark.parametrize("T,H,G,D,Dv", [s for s in SHAPES if s[0] <= 65])
@pytest.mark.parametrize("l,d,lp", [(16, 8, 32), (32, 16, 64), (16, 16, 16)])
def test_block_scores_and_selection_match_loops(T, H, G, D, Dv, l, d, lp):
    gen = make_gen(T * 100 + G + l + lp)
    Nc = ref.num_cmp_tokens(T, l, d)
    q, k_cmp, v_cmp = randn(gen, 1, T, H * G, D), randn(gen, 1, Nc, H, D), randn(gen, 1, Nc, H, Dv)
    sizes = dict(block_size=l, block_stride=d)
    _, lse = ref.compressed_attention(q, k_cmp, v_cmp, **sizes)
    S = ref.block_scores(q, k_cmp, lse, select_size=lp, **sizes)
    S_loop = loop_block_scores(q[0], k_cmp[0], lse[0], l, d, lp, D ** -0.5)
    assert_close(S[0], S_loop)
    for n, n_init, n_local in [(3, 1, 2), (2, 0, 1), (4, 2, 1), (16, 1, 2)]:
        idx = ref.select_blocks(q, k_cmp, lse, select_size=lp, num_selected=n, num_initial=n_init,
                                num_local=n_local, **sizes)
        assert idx.dtype == torch.int32 and idx.shape == (1, T, H, n)
        assert torch.equal(idx[0], loop_select(S_loop, lp, n, n_init, n_local))


def test_nsa_attention_combines_the_branches():
    gen = make_gen(7)
    T, H, G, D, Dv = 130, 2, 3, 8, 5
    hp = dict(block_size=16, block_stride=8, select_size=32, num_selected=3, num_initial=1, num_local=1,
              window_size=7, scale=0.4)
    Nc = ref.num_cmp_tokens(T, 16, 8)
    q, k, v = randn(gen, 2, T, H * G, D), randn(gen, 2, T, H, D), randn(gen, 2, T, H, Dv)
    k_cmp, v_cmp = randn(gen, 2, Nc, H, D), randn(gen, 2, Nc, H, Dv)
    gates = [torch.rand(2, T, H * G, generator=gen, dtype=F64) for _ in range(3)]
    o, idx = ref.nsa_attention(q, k, v, k_cmp, v_cmp, *gates, return_block_indices=True, **hp)
    o_cmp, lse = ref.compressed_attention(q, k_cmp, v_cmp, block_size=16, block_stride=8, scale=0.4)
    expected_idx = ref.select_blocks(q, k_cmp, lse, block_size=16, block_stride=8, select_size=32,
                                     num_selected=3, num_initial=1, num_local=1, scale=0.4)
    assert torch.equal(idx, expected_idx)
    o_slc = ref.selected_attention(q, k, v, idx, select_size=32, scale=0.4)
    o_swa = ref.sliding_window_attention(q, k, v, window_size=7, scale=0.4)
    g_cmp, g_slc, g_swa = (g.unsqueeze(-1) for g in gates)
    assert_close(o, g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa)
    assert torch.equal(ref.nsa_attention(q, k, v, k_cmp, v_cmp, *gates, **hp), o)


# ----------------------------------------------------------------------------------------------
# Selection details


def test_overlap_weights_are_1_2_2_2_1():
    """l=32, d=16, l'=64: compressed tokens 4j-1 .. 4j+3 weigh 1, 2, 2, 2, 1 in block j."""
    T, Nc = 256, ref.num_cmp_tokens(256, 32, 16)  # 15 compressed tokens, 4 blocks
    k_cmp = torch.eye(Nc, dtype=F64)[None, :, None, :]  # [1, Nc, 1, Nc]
    expected = {j: {4 * j - 1: 1, 4 * j: 2, 4 * j + 1: 2, 4 * j + 2: 2, 4 * j + 3: 1} for j in range(4)}
    for i in range(Nc):
        # The last query sees every compressed token; a large scale makes p_cmp one-hot on i.
        q = torch.zeros(1, T, 1, Nc, dtype=F64)
        q[0, :, 0, i] = 1.0
        q = q + 1e-3 * randn(make_gen(i), 1, T, 1, Nc)
        kw = dict(block_size=32, block_stride=16, scale=80.0)
        _, lse = ref.compressed_attention(q, k_cmp, k_cmp, **kw)
        S = ref.block_scores(q, k_cmp, lse, select_size=64, **kw)[0, T - 1, 0]
        weights = torch.tensor([expected[j].get(i, 0) for j in range(4)], dtype=F64)
        torch.testing.assert_close(S, weights, rtol=0, atol=1e-10)


def test_selection_forced_blocks_padding_and_ties():
    """scale = 0 and lse = 0 make every visible p_cmp exactly 1, so all fully covered blocks tie
    exactly: the free slots must go to the smallest such j."""
    gen = make_gen(3)
    T, H, G, D = 700, 2, 2, 4
    l, d, lp, n, n_init, n_local = 32, 16, 64, 5, 1, 2
    Nc = ref.num_cmp_tokens(T, l, d)
    q, k_cmp = randn(gen, 1, T, H * G, D), randn(gen, 1, Nc, H, D)
    lse = torch.zeros(1, T, H * G, dtype=F64)
    kw = dict(block_size=l, block_stride=d, select_size=lp, scale=0.0)
    idx = ref.select_blocks(q, k_cmp, lse, num_selected=n, num_initial=n_init, num_local=n_local, **kw)[0]
    S = ref.block_scores(q, k_cmp, lse, **kw)[0]
    assert torch.equal(idx, loop_select(S, lp, n, n_init, n_local))
    for t in range(T):
        b = t // lp
        for g in range(H):
            row = idx[t, g].tolist()
            chosen = [j for j in row if j >= 0]
            assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
            assert row == chosen + [-1] * (n - len(chosen))  # -1 only as trailing padding
            assert len(chosen) == min(n, b + 1)
            forced = {j for j in range(b + 1) if j < n_init or j > b - n_local}
            assert forced <= set(chosen)
    # Query 699 (block 10): blocks 1..8 are fully covered and tie; free slots take 1 and 2.
    assert idx[699, 0].tolist() == [0, 1, 2, 9, 10]
    assert S[699, 0, 1] == S[699, 0, 8]
    # Query 0: only block 0 is a candidate.
    assert idx[0, 1].tolist() == [0, -1, -1, -1, -1]


# ----------------------------------------------------------------------------------------------
# Varlen


def test_cmp_seqlens_offsets():
    cu = torch.tensor([0, 0, 1, 33, 64, 130], dtype=torch.int32)
    offsets = ref.cmp_seqlens_offsets(cu, 32, 16)
    assert offsets.dtype == torch.int32
    lens = [0, 1, 32, 31, 66]
    expected = [0]
    for n in lens:
        expected.append(expected[-1] + ref.num_cmp_tokens(n, 32, 16))
    assert offsets.tolist() == expected == [0, 0, 0, 1, 1, 4]


@pytest.mark.parametrize("lens", [[0, 1, 33, 70, 0, 17], [130], [1, 1]])
def test_varlen_equals_per_sequence_calls(lens):
    gen = make_gen(sum(lens))
    H, G, D, Dv = 2, 3, 8, 5
    l, d, lp = 16, 8, 32
    hp = dict(block_size=l, block_stride=d, select_size=lp, num_selected=3, num_initial=1, num_local=1,
              window_size=7)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_cmp = ref.cmp_seqlens_offsets(cu, l, d)
    T, Nc = int(cu[-1]), int(cu_cmp[-1])
    q, k, v = randn(gen, 1, T, H * G, D), randn(gen, 1, T, H, D), randn(gen, 1, T, H, Dv)
    k_cmp, v_cmp = randn(gen, 1, Nc, H, D), randn(gen, 1, Nc, H, Dv)
    gates = [torch.rand(1, T, H * G, generator=gen, dtype=F64) for _ in range(3)]
    cmp_kw = dict(block_size=l, block_stride=d)
    sel_kw = dict(cmp_kw, select_size=lp, num_selected=3, num_initial=1, num_local=1)

    o_cmp, lse = ref.compressed_attention(q, k_cmp, v_cmp, cu_seqlens=cu, **cmp_kw)
    idx = ref.select_blocks(q, k_cmp, lse, cu_seqlens=cu, **sel_kw)
    S = ref.block_scores(q, k_cmp, lse, cu_seqlens=cu, **cmp_kw, select_size=lp)
    o_slc = ref.selected_attention(q, k, v, idx, select_size=lp, cu_seqlens=cu)
    o_swa = ref.sliding_window_attention(q, k, v, window_size=7, cu_seqlens=cu)
    o, idx_nsa = ref.nsa_attention(q, k, v, k_cmp, v_cmp, *gates, cu_seqlens=cu, return_block_indices=True,
                                   **hp)
    assert torch.equal(idx_nsa, idx)
    NB = (max(lens) + lp - 1) // lp
    assert S.shape == (1, T, H, NB)

    for s in range(len(lens)):
        a, b, ca, cb = int(cu[s]), int(cu[s + 1]), int(cu_cmp[s]), int(cu_cmp[s + 1])
        qs, ks, vs = q[:, a:b], k[:, a:b], v[:, a:b]
        kcs, vcs = k_cmp[:, ca:cb], v_cmp[:, ca:cb]
        o_cmp_s, lse_s = ref.compressed_attention(qs, kcs, vcs, **cmp_kw)
        assert_close(o_cmp[:, a:b], o_cmp_s)
        assert_close(lse[:, a:b], lse_s)
        S_s = ref.block_scores(qs, kcs, lse_s, **cmp_kw, select_size=lp)
        assert_close(S[:, a:b, :, : S_s.shape[-1]], S_s)
        assert (S[:, a:b, :, S_s.shape[-1]:] == -math.inf).all()
        assert torch.equal(idx[:, a:b], ref.select_blocks(qs, kcs, lse_s, **sel_kw))
        assert_close(o_slc[:, a:b], ref.selected_attention(qs, ks, vs, idx[:, a:b], select_size=lp))
        assert_close(o_swa[:, a:b], ref.sliding_window_attention(qs, ks, vs, window_size=7))
        gs = [g[:, a:b] for g in gates]
        assert_close(o[:, a:b], ref.nsa_attention(qs, ks, vs, kcs, vcs, *gs, **hp))


# ----------------------------------------------------------------------------------------------
# Gradients, dtypes


def test_gradients_finite_and_zero_for_rows_that_see_nothing():
    gen = make_gen(11)
    T, H, G, D, Dv = 45, 2, 2, 8, 6  # with l = 32, queries 0..30 see no compressed token
    l, d, lp = 32, 16, 16
    Nc = ref.num_cmp_tokens(T, l, d)
    leaves = [randn(gen, 1, T, H * G, D), randn(gen, 1, T, H, D), randn(gen, 1, T, H, Dv),
              randn(gen, 1, Nc, H, D), randn(gen, 1, Nc, H, Dv)]
    q, k, v, k_cmp, v_cmp = [x.requires_grad_() for x in leaves]

    o_cmp, lse = ref.compressed_attention(q, k_cmp, v_cmp, block_size=l, block_stride=d)
    assert (lse[0, : l - 1] == -math.inf).all() and torch.isfinite(lse[0, l - 1:]).all()
    assert (o_cmp[0, : l - 1] == 0).all()
    # Odd queries select nothing at all.
    idx = torch.randint(0, 3, (1, T, H, 1), generator=gen, dtype=torch.int32)
    idx = torch.where(idx > torch.arange(T)[None, :, None, None] // lp, -1, idx)
    idx[:, 1::2] = -1
    idx[:, 2] = 0
    o_slc = ref.selected_attention(q, k, v, idx, select_size=lp)
    assert (o_slc[0, 1::2] == 0).all()

    loss = ((o_cmp * randn(gen, *o_cmp.shape)).sum() + (o_slc * randn(gen, *o_slc.shape)).sum()
            + (torch.where(torch.isfinite(lse), lse, 0) * randn(gen, *lse.shape)).sum())
    grads = torch.autograd.grad(loss, [q, k, v, k_cmp, v_cmp], retain_graph=True)
    for g in grads:
        assert torch.isfinite(g).all()
    dq = grads[0][0]
    assert (dq[1 : l - 1 : 2] == 0).all()  # odd rows before l - 1: nothing seen in either branch
    assert (dq[2] != 0).any()  # row 2 selects block 0: keys 0..2

    # lse itself: the gradient of the -inf rows is 0, not NaN.
    (dq_lse,) = torch.autograd.grad(lse.masked_fill(~torch.isfinite(lse), 0).sum(), [q])
    assert torch.isfinite(dq_lse).all() and (dq_lse[0, : l - 1] == 0).all()

    # nsa_attention end to end, gates included, with T < l (no compressed token at all).
    q2, k2, v2 = [x[:, :20].detach().requires_grad_() for x in (q, k, v)]
    kc2, vc2 = k_cmp[:, :0].detach().requires_grad_(), v_cmp[:, :0].detach().requires_grad_()
    gates = [torch.rand(1, 20, H * G, generator=gen, dtype=F64).requires_grad_() for _ in range(3)]
    o = ref.nsa_attention(q2, k2, v2, kc2, vc2, *gates, block_size=l, block_stride=d, select_size=lp,
                          num_selected=2, num_initial=1, num_local=1, window_size=5)
    grads = torch.autograd.grad((o * randn(gen, *o.shape)).sum(), [q2, k2, v2, kc2, vc2, *gates])
    for g in grads:
        assert torch.isfinite(g).all()
    assert (grads[5] == 0).all()  # g_cmp multiplies o_cmp = 0


def test_gradcheck_small():
    gen = make_gen(5)
    T, H, G, D, Dv = 13, 1, 2, 3, 2
    l, d = 4, 2
    Nc = ref.num_cmp_tokens(T, l, d)
    q, k, v = randn(gen, 1, T, H * G, D), randn(gen, 1, T, H, D), randn(gen, 1, T, H, Dv)
    k_cmp, v_cmp = randn(gen, 1, Nc, H, D), randn(gen, 1, Nc, H, Dv)
    inputs = [x.requires_grad_() for x in (q, k, v, k_cmp, v_cmp)]
    idx = random_block_indices(gen, T, H, 2, 4)[None]

    def fn(q, k, v, k_cmp, v_cmp):
        o_cmp, lse = ref.compressed_attention(q, k_cmp, v_cmp, block_size=l, block_stride=d)
        return (o_cmp, torch.where(torch.isfinite(lse), lse, 0),
                ref.selected_attention(q, k, v, idx, select_size=4),
                ref.sliding_window_attention(q, k, v, window_size=3))

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    gen = make_gen(2)
    T, H, G, D = 70, 2, 2, 8
    Nc = ref.num_cmp_tokens(T, 32, 16)
    q, k, v = randn(gen, 1, T, H * G, D), randn(gen, 1, T, H, D), randn(gen, 1, T, H, D)
    k_cmp, v_cmp = randn(gen, 1, Nc, H, D), randn(gen, 1, Nc, H, D)
    gates = [torch.rand(1, T, H * G, generator=gen, dtype=F64) for _ in range(3)]
    args64 = (q, k, v, k_cmp, v_cmp, *gates)
    args = [x.to(dtype) for x in (q, k, v, k_cmp, v_cmp, *gates)]
    # With l' = 32 and n = 2 at T = 70 every selected block is forced: no near-tie can flip.
    hp = dict(num_selected=2, num_initial=1, num_local=1, select_size=32, window_size=9)
    o64 = ref.nsa_attention(*(x.double() for x in args), **hp)
    o_cmp, lse = ref.compressed_attention(args[0], args[3], args[4])
    assert o_cmp.dtype == dtype and lse.dtype == torch.float32
    o = ref.nsa_attention(*args, **hp)
    assert o.dtype == dtype
    err = (o.double() - o64).norm() / o64.norm()
    assert err < {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


# ----------------------------------------------------------------------------------------------
# Errors


def test_hyper_parameter_errors_name_the_argument():
    gen = make_gen(1)
    q, k_cmp = randn(gen, 1, 40, 2, 4), randn(gen, 1, 1, 1, 4)
    lse = torch.zeros(1, 40, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"nsa_torch\.reference\.select_blocks: select_size \(48\) "
                                         r"must be a multiple of block_stride \(32\)"):
        ref.select_blocks(q, k_cmp, lse, block_size=32, block_stride=32, select_size=48)
    with pytest.raises(ValueError, match=r"compressed_attention: block_size \(24\) must be a multiple of "
                                         r"block_stride \(16\)"):
        ref.compressed_attention(q, k_cmp, k_cmp, block_size=24)
    with pytest.raises(ValueError, match=r"num_selected \(2\) must be >= num_initial \+ num_local"):
        ref.select_blocks(q, k_cmp, lse, num_selected=2)
    with pytest.raises(ValueError, match=r"window_size \(0\) must be a positive integer"):
        ref.sliding_window_attention(q, k_cmp.expand(1, 40, 1, 4), k_cmp.expand(1, 40, 1, 4), window_size=0)
    with pytest.raises(ValueError, match=r"block_stride \(0\)"):
        ref.compressed_attention(q, k_cmp, k_cmp, block_stride=0)


def test_shape_and_index_errors():
    gen = make_gen(1)
    q, k, v = randn(gen, 1, 40, 3, 4), randn(gen, 1, 40, 2, 4), randn(gen, 1, 40, 2, 4)
    with pytest.raises(ValueError, match=r"must divide the query heads"):
        ref.sliding_window_attention(q, k, v)
    q = randn(gen, 1, 40, 4, 4)
    with pytest.raises(ValueError, match=r"k_cmp must have Nc\(T\).* = 1 rows, got 2"):
        ref.compressed_attention(q, randn(gen, 1, 2, 2, 4), randn(gen, 1, 2, 2, 4))
    bad = torch.full((1, 40, 2, 2), -1, dtype=torch.int32)
    bad[0, 3, 1, 0] = 1  # the sequence has one block of 64 tokens
    with pytest.raises(ValueError, match=r"block_indices\[0, 3, 1, 0\] = 1 is out of range"):
        ref.selected_attention(q, k, v, bad)
    bad[0, 3, 1, :] = 0
    with pytest.raises(ValueError, match=r"lists a block twice"):
        ref.selected_attention(q, k, v, bad)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0"):
        ref.sliding_window_attention(q, k, v, cu_seqlens=torch.tensor([0, 50], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must be an int32 tensor"):
        ref.sliding_window_attention(q, k, v, cu_seqlens=torch.tensor([0, 40]))
