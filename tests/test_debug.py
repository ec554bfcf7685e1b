"""nsa_torch._debug: forcing CUDA kernels and recording the plans that ran.

The checks of force() run on the CPU (the overrides are validated by the compiled module); the
CUDA tests check that every forced kernel is the one recorded, that its results match the float64
reference, and that a kernel the shape or GPU cannot take is refused at the op call."""
import pytest
import torch

import nsa_torch
from nsa_torch import _debug, reference

KINDS = {"fwd": ("wgmma", "wide", "mma"), "bwd": ("wgmma", "mma"), "slc_fwd": ("warp", "union", "blocks"),
         "slc_dq": ("tokens", "blocks"), "select": ("wgmma", "mma"), "split_tokens": (),
         "slc_chunk_rows": (), "cmp_splits": (), "slc_splits": (), "sel_splits": (),
         "window_order": ("after_scan", "before_scan", "after_select"), "dep_wait": ("grid", "head"),
         "scan_order": ("together", "keys_first")}


# ------------------------------------------------------------------------------------ on the CPU
def test_keys():
    assert _debug.keys() == KINDS


@pytest.mark.parametrize("choices,match", [
    (dict(fwdd="wide"), 'unknown key "fwdd"'),
    (dict(fwd="narrow"), 'fwd="narrow" is not a kernel; expected one of "wgmma", "wide", "mma"'),
    (dict(fwd="wgmma_kv2"), 'fwd="wgmma_kv2"'),
    (dict(slc_dq="warp"), '"tokens", "blocks"'),
    (dict(select=1), "select=1: expected one of"),
    (dict(bwd=True), "bwd=True: expected a kernel name"),
    (dict(split_tokens=-1), "split_tokens=-1: expected an int >= 0"),
    (dict(split_tokens="64"), 'split_tokens="64": expected an int >= 0'),
    (dict(split_tokens=True), "split_tokens=True"),
    (dict(split_tokens=2**70), "split_tokens is out of range"),
    (dict(slc_chunk_rows=0), "slc_chunk_rows=0: expected an int >= 1"),
    (dict(slc_chunk_rows=1.5), "slc_chunk_rows=1.5"),
    (dict(sel_splits=65), "sel_splits=65: expected an int in [1, 64]"),
])
def test_force_refuses_unknown_keys_and_values_when_called(choices, match):
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("(", r"\(")):
        _debug.force(**choices)  # raises before any `with`


def test_force_accepts_every_kind():
    for key, kinds in KINDS.items():
        for kind in kinds:
            with _debug.force(**{key: kind}):
                pass
    with _debug.force(fwd="wide", bwd="mma", slc_fwd="blocks", slc_dq="tokens", select="mma",
                      split_tokens=0, slc_chunk_rows=100):
        pass


def _cpu_inputs(T=40, HQ=4, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, HQ, D, generator=g)
    k = torch.randn(1, T, H, D, generator=g)
    v = torch.randn(1, T, H, D, generator=g)
    return q, k, v


def test_force_nests_restores_and_leaves_cpu_ops_alone():
    """CPU op calls have no plan: forcing does not change them and nothing is recorded. Nested
    forces restore the outer overrides, also after an exception; None removes a key's override."""
    q, k, v = _cpu_inputs()
    expected = nsa_torch.sliding_window_attention(q, k, v, window_size=8)
    with _debug.plans() as ran:
        with _debug.force(fwd="mma", split_tokens=64):
            with _debug.force(fwd=None, bwd="mma"):
                o = nsa_torch.sliding_window_attention(q, k, v, window_size=8)
            with pytest.raises(RuntimeError, match="inner"):
                with _debug.force(fwd="wide"):
                    raise RuntimeError("inner")
    assert torch.equal(o, expected)
    assert ran == []
    assert len(ran) == 0


def test_plans_nest_and_close():
    with _debug.plans() as outer:
        with _debug.plans() as inner:
            pass
        assert inner == []
    assert outer == []
    assert not outer


# -------------------------------------------------------------- decode_attention's phase trace
def test_decode_trace_refuses_bad_buffers():
    with pytest.raises(ValueError, match="blocks must be an int >= 1, got 0"):
        _debug.decode_trace(0)
    for address, blocks in [(0, 5), (4096, 0), (4096, -1)]:
        with pytest.raises(ValueError, match="expected a buffer and blocks > 0, or neither"):
            nsa_torch._C._debug_decode_trace(address, blocks)
    nsa_torch._C._debug_decode_trace(0, 0)  # none: accepted
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="decode_trace: needs a CUDA device"):
            _debug.decode_trace()


def test_trace_summary_reads_each_kernels_phases():
    """us after the step's first block start (any kernel's), min / median / max over the blocks
    that stored an event; events nobody stored are left out."""
    assert _debug.TRACE_EVENTS == ("start", "waited", "step1", "step2", "mid", "end")
    assert _debug.TRACE_KERNELS == ("window", "scan", "select", "sparse", "combine")
    buf = torch.zeros(5, 3, 6, dtype=torch.int64)
    t0 = 10**12
    buf[0, 2, 0] = t0 - 500                                        # a window start, the first
    buf[1, :, 0] = torch.tensor([t0 + 1000, t0, t0 + 2000])       # scan starts
    buf[1, :2, 5] = torch.tensor([t0 + 9000, t0 + 7000])          # two scan ends
    buf[4, 1, 1] = t0 + 20500                                      # one combine wait
    got = _debug.trace_summary(buf)
    assert got["window"] == {"start": (0.0, 0.0, 0.0)}
    assert got["scan"] == {"start": (0.5, 1.5, 2.5), "end": (7.5, 7.5, 9.5)}
    assert got["combine"] == {"waited": (21.0, 21.0, 21.0)} and got["select"] == {} == got["sparse"]
    with pytest.raises(ValueError, match="no kernel stored a start"):
        _debug.trace_summary(torch.zeros(5, 3, 6, dtype=torch.int64))


# ------------------------------------------------------------------------------------ on CUDA
def sm90():
    return torch.cuda.get_device_capability() == (9, 0)


def cuda_inputs(*, T=300, HQ=8, H=2, D=64, Dv=None, block_size=32, block_stride=16, seed=0):
    """q, k, v, k_cmp, v_cmp in bf16 on the GPU (normal, seeded)."""
    Dv = D if Dv is None else Dv
    g = torch.Generator(device="cuda").manual_seed(seed)
    Nc = reference.num_cmp_tokens(T, block_size, block_stride)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)
    return dict(q=randn(1, T, HQ, D), k=randn(1, T, H, D), v=randn(1, T, H, Dv),
                k_cmp=randn(1, Nc, H, D), v_cmp=randn(1, Nc, H, Dv))


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_fwd_bwd(fn, ref_fn, x, names):
    """fn on x in bf16 (forward, then backward under a fixed upstream gradient) against ref_fn on
    x in float64: relative errors within bf16's bounds (docs/design.md section 5: 1e-2, 2e-2 for gradients)."""
    ours = {n: leaf(x[n]) for n in names}
    ref = {n: leaf(x[n].double()) for n in names}
    o = fn(**ours)
    r = ref_fn(**ref)
    assert rel(o, r) <= 1e-2
    dout = torch.randn(o.shape, generator=torch.Generator(device="cuda").manual_seed(7), device="cuda")
    o.backward(dout.to(o.dtype))
    r.backward(dout.double())
    for n in names:
        assert rel(ours[n].grad, ref[n].grad) <= 2e-2, n


def only(ran, op):
    entries = [r for r in ran if r["op"] == op]
    assert len(entries) == 1, ran
    return entries[0]


def cmp_fn(lib):
    return lambda q, k_cmp, v_cmp: lib.compressed_attention(q, k_cmp, v_cmp, block_size=32, block_stride=16)[0]


def swa_fn(lib):
    return lambda q, k, v: lib.sliding_window_attention(q, k, v, window_size=100)


def slc_fn(lib, idx):
    return lambda q, k, v: lib.selected_attention(q, k, v, idx, select_size=64)


def block_indices(x):
    """The reference's own selection of x (in float64), as int32 on the GPU."""
    q, k_cmp = x["q"].double(), x["k_cmp"].double()
    _, lse = reference.compressed_attention(q, k_cmp, x["v_cmp"].double(), block_size=32, block_stride=16)
    return reference.select_blocks(q, k_cmp, lse, block_size=32, block_stride=16, select_size=64,
                                   num_selected=4, num_initial=1, num_local=2).to(torch.int32)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["wgmma", "wide", "mma"])
@pytest.mark.parametrize("branch", ["cmp", "swa"])
def test_forced_fwd_is_the_one_that_ran(branch, kind):
    if kind == "wgmma" and not sm90():
        pytest.skip("wgmma needs sm_90")
    x = cuda_inputs()
    fn, ref_fn, names, op = {
        "cmp": (cmp_fn(nsa_torch), cmp_fn(reference), ("q", "k_cmp", "v_cmp"), "nsa.compressed_attention"),
        "swa": (swa_fn(nsa_torch), swa_fn(reference), ("q", "k", "v"), "nsa.sliding_window_attention"),
    }[branch]
    with _debug.force(fwd=kind), _debug.plans() as ran:
        run_fwd_bwd(fn, ref_fn, x, names)
    assert only(ran, op + "_fwd")["fwd"] == kind
    assert "fwd" not in only(ran, op + "_bwd")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["wgmma", "mma"])
@pytest.mark.parametrize("split_tokens", [0, 64])
@pytest.mark.parametrize("branch", ["cmp", "slc", "swa"])
def test_forced_bwd_and_split_are_the_ones_that_ran(branch, kind, split_tokens):
    if kind == "wgmma" and not sm90():
        pytest.skip("wgmma needs sm_90")
    x = cuda_inputs(seed=1)
    idx = block_indices(x)
    fn, ref_fn, names, op = {
        "cmp": (cmp_fn(nsa_torch), cmp_fn(reference), ("q", "k_cmp", "v_cmp"), "nsa.compressed_attention"),
        "slc": (slc_fn(nsa_torch, idx), slc_fn(reference, idx), ("q", "k", "v"), "nsa.selected_attention"),
        "swa": (swa_fn(nsa_torch), swa_fn(reference), ("q", "k", "v"), "nsa.sliding_window_attention"),
    }[branch]
    with _debug.force(bwd=kind, split_tokens=split_tokens), _debug.plans() as ran:
        run_fwd_bwd(fn, ref_fn, x, names)
    plan = only(ran, op + "_bwd")
    assert plan["bwd"] == kind
    if branch == "swa":
        assert "split" not in plan
    else:
        assert plan["split_tokens"] == split_tokens
        assert plan["split"] == (300 // 64 if split_tokens else 1)


@pytest.mark.cuda
@pytest.mark.parametrize("slc_dq", ["tokens", "blocks"])
@pytest.mark.parametrize("slc_fwd", ["warp", "union", "blocks"])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_forced_selected_kernels_are_the_ones_that_ran(G, slc_fwd, slc_dq):
    if "blocks" in (slc_fwd, slc_dq) and not sm90():
        pytest.skip("the selected branch by blocks needs sm_90")
    x = cuda_inputs(HQ=4 * G, H=4, seed=G)
    idx = block_indices(x)
    with _debug.force(slc_fwd=slc_fwd, slc_dq=slc_dq, slc_chunk_rows=70), _debug.plans() as ran:
        run_fwd_bwd(slc_fn(nsa_torch, idx), slc_fn(reference, idx), x, ("q", "k", "v"))
    fwd = only(ran, "nsa.selected_attention_fwd")
    bwd = only(ran, "nsa.selected_attention_bwd")
    assert fwd["slc_fwd"] == slc_fwd
    assert bwd["slc_dq"] == slc_dq
    if slc_fwd == "blocks":
        assert fwd["slc_chunk_rows"] == 70
    if slc_dq == "blocks":
        assert bwd["slc_chunk_rows"] == 70
    else:  # the per-token dQ follows a forced warp or union, else the default for G (warp below 64)
        assert bwd["slc_tokens"] == (slc_fwd if slc_fwd != "blocks" else "warp")


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["wgmma", "mma"])
@pytest.mark.parametrize("G", [16, 32])
def test_forced_select_is_the_one_that_ran(G, kind):
    if kind == "wgmma" and not sm90():
        pytest.skip("wgmma needs sm_90")
    x = cuda_inputs(T=1100, HQ=2 * G, H=2, D=128)
    _, lse = nsa_torch.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"])
    with _debug.force(select=kind), _debug.plans() as ran:
        idx = nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, num_selected=8)
        assert len(ran) == 1  # live while open
    assert only(ran, "nsa.select_blocks")["select"] == kind
    # Both kernels score by the same rule: near-ties aside, the same blocks.
    ref = reference.select_blocks(x["q"].double(), x["k_cmp"].double(), lse.double(), num_selected=8)
    same = (idx.sort(-1).values == ref.to(idx.device).sort(-1).values).all(-1).float().mean().item()
    assert same >= 0.95


@pytest.mark.cuda
def test_default_plans_are_recorded_in_call_order():
    """Without overrides: one plan per op call of nsa_attention's forward and backward, with the
    GPU's facts; sm_90 takes the warpgroup kernels for D = 64."""
    x = cuda_inputs(T=200, HQ=16, H=1)
    ours = {n: leaf(t) for n, t in x.items()}
    gates = [torch.rand(1, 200, 16, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    with _debug.plans() as ran:
        o = nsa_torch.nsa_attention(ours["q"], ours["k"], ours["v"], ours["k_cmp"], ours["v_cmp"], *gates)
        forward_ops = [r["op"] for r in ran]
        o.float().sum().backward()
    assert forward_ops[0] == "nsa.compressed_attention_fwd"
    assert set(forward_ops) == {"nsa.compressed_attention_fwd", "nsa.select_blocks",
                                "nsa.selected_attention_fwd", "nsa.sliding_window_attention_fwd"}
    assert {r["op"] for r in ran[len(forward_ops):]} == {
        "nsa.compressed_attention_bwd", "nsa.selected_attention_bwd", "nsa.sliding_window_attention_bwd"}
    major, minor = torch.cuda.get_device_capability()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert all(r["arch"] == 10 * major + minor and r["num_sms"] == sms for r in ran)
    if sm90():
        assert only(ran, "nsa.compressed_attention_fwd")["fwd"] == "wgmma"
        assert only(ran, "nsa.select_blocks")["select"] == "wgmma"  # G = 16
        assert only(ran, "nsa.selected_attention_fwd")["slc_fwd"] == "warp"  # G = 16: by tokens


# (overrides, call, its shape: HQ, H, D, Dv, the error's pattern)
REFUSED = {
    "cmp-fwd-wgmma-d192": (dict(fwd="wgmma"), "cmp", (8, 2, 192, 128),
                           r'nsa.compressed_attention: nsa_torch._debug.force\(fwd="wgmma"\) cannot run: '),
    "swa-fwd-wide-d192": (dict(fwd="wide"), "swa", (8, 2, 192, 128),
                          r'force\(fwd="wide"\) cannot run: needs D, Dv <= 128, got D = 192'),
    "cmp-bwd-wgmma-d192": (dict(bwd="wgmma"), "cmp-bwd", (8, 2, 192, 128), r'force\(bwd="wgmma"\) cannot run: '),
    "slc-warp-G64": (dict(slc_fwd="warp"), "slc", (64, 1, 64, 64),
                     r'force\(slc_fwd="warp"\) cannot run: needs a group size G < 64, got G = 64'),
    "slc-blocks-d192": (dict(slc_fwd="blocks"), "slc", (8, 2, 192, 128), r'force\(slc_fwd="blocks"\) cannot run: '),
    "select-wgmma-G4": (dict(select="wgmma"), "select", (8, 2, 64, 64),
                        r'nsa.select_blocks: nsa_torch._debug.force\(select="wgmma"\) cannot run: .*G'),
}


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(REFUSED))
def test_forcing_what_cannot_run_raises_at_the_call(name):
    """ValueError naming the op, the key, the value and why; without the override the call runs."""
    choices, call, (HQ, H, D, Dv), match = REFUSED[name]
    x = cuda_inputs(T=100, HQ=HQ, H=H, D=D, Dv=Dv)
    idx = torch.full((1, 100, H, 4), -1, dtype=torch.int32, device="cuda")

    def run():
        if call == "cmp":
            cmp_fn(nsa_torch)(x["q"], x["k_cmp"], x["v_cmp"])
        elif call == "swa":
            swa_fn(nsa_torch)(x["q"], x["k"], x["v"])
        elif call == "slc":
            slc_fn(nsa_torch, idx)(x["q"], x["k"], x["v"])
        elif call == "select":
            lse = torch.zeros(1, 100, HQ, device="cuda")
            nsa_torch.select_blocks(x["q"], x["k_cmp"], lse, num_selected=4)
        else:  # the backward alone is forced
            q = leaf(x["q"])
            o = cmp_fn(nsa_torch)(q, x["k_cmp"], x["v_cmp"])
            with _debug.force(**choices):
                with pytest.raises(ValueError, match=match):
                    o.float().sum().backward(retain_graph=True)
            o.float().sum().backward()

    if call == "cmp-bwd":
        run()
        return
    with _debug.force(**choices):
        with pytest.raises(ValueError, match=match):
            run()
    run()
