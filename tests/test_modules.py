"""nsa_torch.NativeSparseAttention on CPU: shapes and dtypes, the documented semantics (against a
plain re-implementation on nsa_torch.reference), gradients to every parameter, varlen packing,
torch.compile, activation checkpointing, autocast, a short training run, and bad input."""
import math
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import nsa_torch
from nsa_torch import reference
from nsa_torch import modules
from nsa_torch.modules import FullAttention
from helpers import assert_close, count_calls, cu_seqlens_of

F64 = torch.float64
# Small hyper-parameters so that every branch matters at T ~ 50: 4-token windows every 2 tokens,
# 4-token selection blocks, 3 selected (1 initial, 1 local), a window of 6.
SMALL = dict(block_size=4, block_stride=2, select_size=4, num_selected=3, num_initial=1,
             num_local=1, window_size=6)


def make_layer(compression="mlp", separate_branch_kv=False, dtype=torch.float32, seed=0,
               hidden=24, HQ=4, H=2, D=8, Dv=6, randomize=True, **kw):
    torch.manual_seed(seed)
    layer = nsa_torch.NativeSparseAttention(hidden, HQ, H, D, Dv, compression=compression,
                                            separate_branch_kv=separate_branch_kv,
                                            **{**SMALL, **kw})
    if randomize:  # every path live (the MLP's second layer and the gate bias start at zero)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn_like(p) / math.sqrt(max(p.shape[-1], 1)))
    return layer.to(dtype)


def ref_rope(t, p, theta):
    """Rotary embedding of t [B, T, heads, D] at positions p [B, T]: pairs (j, j + D/2) as complex
    numbers times exp(i p theta^(-2j/D))."""
    half = t.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=F64) * 2 / t.shape[-1])
    rot = torch.polar(torch.ones_like(freq), p.to(F64)[..., None] * freq)[:, :, None, :]
    z = torch.complex(t[..., :half].to(F64), t[..., half:].to(F64)) * rot
    return torch.cat((z.real, z.imag), -1).to(t.dtype)


def ref_layer(layer, x, position_ids=None):
    """The layer's documented forward, written again from its docstrings: explicit windows, the
    complex-number form of the rotary embedding, nsa_torch.reference for the attention."""
    c = layer.config
    B, T, _ = x.shape
    HQ, H, D, Dv = c.num_heads, c.num_kv_heads, c.head_dim, c.v_head_dim
    pos = torch.arange(T)[None].expand(B, T) if position_ids is None else position_ids

    def rope(t, p):
        return ref_rope(t, p, c.rope_theta)

    def compress(mod, t):
        nc = (T - c.block_size) // c.block_stride + 1 if T >= c.block_size else 0
        rows = []
        for i in range(nc):
            w = t[:, i * c.block_stride:i * c.block_stride + c.block_size]  # [B, l, H, C]
            w = w.permute(0, 2, 1, 3)                                       # [B, H, l, C]
            if mod.kind == "mean":
                rows.append(w.mean(2))
            elif mod.kind == "linear":
                rows.append(w.flatten(-2) @ mod.proj.weight.T)
            else:
                h = torch.nn.functional.silu((w + mod.pos).flatten(-2) @ mod.fc1.weight.T + mod.fc1.bias)
                rows.append(w.mean(2) + h @ mod.fc2.weight.T + mod.fc2.bias)
        if not rows:
            return t.new_zeros(B, 0, H, t.shape[-1])
        return torch.stack(rows, 1)

    lin = torch.nn.functional.linear
    q = lin(x, layer.q_proj.weight, layer.q_proj.bias).view(B, T, HQ, D)

    def kv(s):
        return (lin(x, getattr(layer, "k_proj" + s).weight, getattr(layer, "k_proj" + s).bias).view(B, T, H, D),
                lin(x, getattr(layer, "v_proj" + s).weight, getattr(layer, "v_proj" + s).bias).view(B, T, H, Dv))

    sep = c.separate_branch_kv
    k_c, v_c = kv("_cmp" if sep else "")
    k_cmp, v_cmp = compress(layer.k_compress, k_c), compress(layer.v_compress, v_c)
    ends = torch.arange(k_cmp.shape[1]) * c.block_stride + c.block_size - 1
    k_cmp = rope(k_cmp, pos[:, ends])
    q = rope(q, pos)
    g = torch.sigmoid(lin(x, layer.g_proj.weight, layer.g_proj.bias)).view(B, T, 3, HQ)
    hyper = c.hyper()
    if not sep:
        return lin(reference.nsa_attention(q, rope(k_c, pos), v_c, k_cmp, v_cmp, g[:, :, 0], g[:, :, 1],
                                           g[:, :, 2], **hyper).reshape(B, T, HQ * Dv),
                   layer.o_proj.weight, layer.o_proj.bias)
    o_cmp, lse = reference.compressed_attention(q, k_cmp, v_cmp, block_size=c.block_size,
                                                block_stride=c.block_stride)
    idx = reference.select_blocks(q, k_cmp, lse, block_size=c.block_size, block_stride=c.block_stride,
                                  select_size=c.select_size, num_selected=c.num_selected,
                                  num_initial=c.num_initial, num_local=c.num_local)
    k_s, v_s = kv("_slc")
    o_slc = reference.selected_attention(q, rope(k_s, pos), v_s, idx, select_size=c.select_size)
    k_w, v_w = kv("_swa")
    o_swa = reference.sliding_window_attention(q, rope(k_w, pos), v_w, window_size=c.window_size)
    o = g[:, :, 0, :, None] * o_cmp + g[:, :, 1, :, None] * o_slc + g[:, :, 2, :, None] * o_swa
    return lin(o.reshape(B, T, HQ * Dv), layer.o_proj.weight, layer.o_proj.bias)


@pytest.mark.parametrize("compression", ["mlp", "linear", "mean"])
@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
def test_matches_documented_semantics(compression, separate):
    layer = make_layer(compression, separate, dtype=F64)
    x = torch.randn(2, 37, 24, dtype=F64)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == F64
    assert_close(y, ref_layer(layer, x), 1e-9, "layer output")


def test_shape_and_dtype_float32_and_short_sequences():
    layer = make_layer()
    for T in (1, 3, 4, 50):  # T < block_size: no compressed token
        x = torch.randn(3, T, 24)
        y = layer(x)
        assert y.shape == (3, T, 24) and y.dtype == torch.float32
        assert torch.isfinite(y).all()


def test_default_hyper_parameters_and_from_config():
    layer = nsa_torch.NativeSparseAttention(64, 8, 2, 16)
    assert layer.config.v_head_dim == 16 and layer.config.block_size == 32
    twin = nsa_torch.NativeSparseAttention.from_config(layer.config)
    assert twin.config == layer.config
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(1, 70, 64)
    assert torch.equal(layer(x), twin(x))


def test_rotary_is_relative():
    """Shifting every position by the same offset leaves the output unchanged: queries, keys and
    compressed keys are all rotated at consistent positions."""
    layer = make_layer(dtype=F64)
    x = torch.randn(2, 41, 24, dtype=F64)
    pos = torch.arange(41)[None].expand(2, 41)
    assert_close(layer(x, position_ids=pos + 1000), layer(x), 1e-9, "shifted positions")
    assert_close(layer(x, position_ids=pos + 7), ref_layer(layer, x, pos + 7), 1e-9, "given positions")


@pytest.mark.parametrize("compression", ["mlp", "linear"])
def test_gradcheck_every_parameter(compression):
    layer = make_layer(compression, dtype=F64, hidden=8, HQ=2, H=1, D=4, Dv=2)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(1, 13, 8, dtype=F64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
def test_every_parameter_gets_a_gradient(separate):
    layer = make_layer(separate_branch_kv=separate)
    layer(torch.randn(2, 30, 24)).square().mean().backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"


def check_packed_equals_per_sequence(layer, lengths, tol):
    """layer on the sequences of `lengths` packed (cu_seqlens) against each on its own: outputs
    and parameter gradients within tol."""
    xs = [torch.randn(1, n, 24, dtype=F64, requires_grad=True) for n in lengths]
    cu = cu_seqlens_of(lengths)
    packed = layer(torch.cat(xs, 1), cu_seqlens=cu)
    packed.square().sum().backward()
    g_packed = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    singles = [layer(x) for x in xs]
    sum(y.square().sum() for y in singles).backward()
    assert_close(packed, torch.cat(singles, 1), tol, "packed output")
    for n, p in layer.named_parameters():
        assert_close(g_packed[n], p.grad, tol, f"d{n}")


@pytest.mark.parametrize("compression", ["mlp", "mean"])
def test_packed_varlen_equals_per_sequence(compression):
    check_packed_equals_per_sequence(make_layer(compression, dtype=F64), [13, 1, 0, 22, 5], 1e-9)


def test_packed_batch_derived_once_per_forward(monkeypatch):
    """Every layer gets the same cu_seqlens: its check and host read, its copy, the token
    positions and the window starts are derived once per forward (a wait for the device at every
    layer otherwise, with cu_seqlens on a GPU), again after an in-place change, and let go with
    the tensor; under inference_mode (no version to key on) at every layer."""
    import gc
    from nsa_torch import modules
    calls = {"check": 0, "positions": 0, "starts": 0}
    count_calls(monkeypatch, calls, modules, "_check_packed_now", "check")
    count_calls(monkeypatch, calls, modules, "_packed_positions_now", "positions")
    count_calls(monkeypatch, calls, modules.NativeSparseAttention, "_window_starts", "starts")
    layers = [make_layer(seed=0), make_layer(seed=1)]
    x = torch.randn(1, 60, 24)
    cu = cu_seqlens_of([13, 1, 0, 41, 5])
    with torch.no_grad():
        first = [f(x, cu_seqlens=cu) for f in layers]
        assert calls == {"check": 1, "positions": 1, "starts": 1}
        assert all(torch.equal(a, f(x, cu_seqlens=cu)) for a, f in zip(first, layers))
        assert calls == {"check": 1, "positions": 1, "starts": 1}
        cu[1:] = torch.tensor([30, 30, 30, 55, 60], dtype=torch.int32)  # in place: derived again
        changed = layers[0](x, cu_seqlens=cu)
        assert calls == {"check": 2, "positions": 2, "starts": 2}
        assert torch.equal(changed, layers[0](x, cu_seqlens=cu_seqlens_of([30, 0, 0, 25, 5])))
    del cu
    gc.collect()
    assert len(modules._DERIVED) == 0, "derived values outlive their cu_seqlens"
    calls.update(check=0, positions=0, starts=0)
    with torch.inference_mode():
        cu = cu_seqlens_of([13, 1, 0, 41, 5])
        again = [f(x, cu_seqlens=cu) for f in layers]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert calls == {"check": 2, "positions": 2, "starts": 2}


def check_compiled_matches_eager(layer, x, cu_seqlens=None, tol=1e-5, **compile_kw):
    """torch.compile(layer) against layer: the output, dx and every parameter's gradient."""
    compiled = torch.compile(layer, **compile_kw)
    results = []
    for f in (layer, compiled):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = f(xi, cu_seqlens=cu_seqlens)
        y.float().square().mean().backward()
        results.append((y.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    assert_close(y1, y0, tol, "compiled output")
    assert_close(gx1, gx0, tol, "compiled dx")
    for (n, _), a, b in zip(layer.named_parameters(), gp1, gp0):
        assert_close(a, b, tol, f"compiled d{n}")


def test_compile_fullgraph_matches_eager():
    check_compiled_matches_eager(make_layer(), torch.randn(2, 45, 24), fullgraph=True)


def test_compile_packed_matches_eager():
    """A packed batch under torch.compile (not one graph: the layer reads cu_seqlens on the
    host) = eager."""
    check_compiled_matches_eager(make_layer(), torch.randn(1, 60, 24), cu_seqlens_of([13, 1, 0, 41, 5]))


def test_activation_checkpointing_matches():
    layer = make_layer(dtype=F64)
    x = torch.randn(2, 33, 24, dtype=F64, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    y.square().sum().backward()
    g_ckpt = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    y2 = layer(x)
    y2.square().sum().backward()
    assert_close(y, y2, 1e-12, "checkpointed output")
    for a, b in zip(g_ckpt, [p.grad for p in layer.parameters()] + [x.grad]):
        assert_close(a, b, 1e-12, "checkpointed gradient")


def test_autocast_bfloat16():
    layer = make_layer()
    x = torch.randn(2, 40, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert_close(y.float(), layer(x).detach(), 5e-2, "bf16 autocast output")


def test_training_loss_drops():
    """A one-layer model learns to output the token two positions back (it must attend; the
    window branch can): cross-entropy from ln(16) = 2.77 to below 1.0 in 150 Adam steps."""
    torch.manual_seed(0)
    V, hidden = 16, 32
    emb = torch.nn.Embedding(V, hidden)
    layer = nsa_torch.NativeSparseAttention(hidden, 4, 2, 8, **SMALL)
    head = torch.nn.Linear(hidden, V)
    params = list(emb.parameters()) + list(layer.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(150):
        tok = torch.randint(0, V, (16, 40))
        h = emb(tok)
        logits = head(h + layer(h))[:, 2:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tok[:, :-2].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert first > 2.3 and last < 1.0, f"loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads .6. must be a multiple of num_kv_heads .4."),
    (dict(compression="max"), "compression must be one of"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(block_size=20, block_stride=8), "block_size .20. must be a multiple of block_stride"),
    (dict(num_selected=2, num_initial=2, num_local=2), "num_selected .2. must be >= num_initial"),
    (dict(window_size=0), "window_size must be a positive int"),
])
def test_bad_configuration(kwargs, match):
    args = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nsa_torch.NativeSparseAttention(**args)


def test_bad_input():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, T, hidden_size = 24\], got \[2, 10, 23\]"):
        layer(torch.randn(2, 10, 23))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="packed batch .1, total, hidden_size., got B = 2"):
        layer(torch.randn(2, 10, 24), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        layer(torch.randn(1, 10, 24), cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="cu_seqlens must be on the CPU or on hidden_states' device cpu, got meta"):
        layer(torch.randn(1, 10, 24), cu_seqlens=cu.to("meta"))
    with pytest.raises(ValueError, match=r"position_ids must be \[B, T\] = \[1, 10\], got \[1, 9\]"):
        layer(torch.randn(1, 10, 24), position_ids=torch.arange(9)[None])
    with pytest.raises(ValueError, match="cu_seqlens"):  # last entry != total tokens (the op says so)
        layer(torch.randn(1, 10, 24), cu_seqlens=torch.tensor([0, 4, 12], dtype=torch.int32))


@pytest.mark.parametrize("gqa", [True, False])
def test_full_attention_twin(gqa):
    """FullAttention.twin_of(layer): the layer's own projections (shared), rotary embedding and
    causal softmax attention, against an explicit float64 computation; gradients reach the
    shared projections."""
    layer = make_layer(dtype=F64)
    twin = FullAttention.twin_of(layer, gqa=gqa)
    assert twin.q_proj is layer.q_proj and twin.o_proj is layer.o_proj
    x = torch.randn(2, 11, 24, dtype=F64)
    pos = torch.arange(11)[None].expand(2, 11) * 3  # (not the default positions)
    c = layer.config
    q = ref_rope(layer.q_proj(x).view(2, 11, 4, 8), pos, c.rope_theta)
    k = ref_rope(layer.k_proj(x).view(2, 11, 2, 8), pos, c.rope_theta).repeat_interleave(2, 2)
    v = layer.v_proj(x).view(2, 11, 2, 6).repeat_interleave(2, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(8)
    s = s.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(2, 11, 24)
    assert_close(twin(x, position_ids=pos), layer.o_proj(o), 1e-10, "full attention")
    twin(x).sum().backward()
    assert layer.k_proj.weight.grad is not None
    with pytest.raises(ValueError, match="separate_branch_kv"):
        FullAttention.twin_of(make_layer(separate_branch_kv=True))


@pytest.mark.parametrize("gqa", [True, False])
def test_full_attention_packed_equals_per_sequence(gqa):
    """A packed batch through FullAttention (runs of equal lengths, an empty sequence, a lone
    one) equals each sequence on its own, forward and backward."""
    twin = FullAttention.twin_of(make_layer(dtype=F64), gqa=gqa)
    check_packed_equals_per_sequence(twin, [7, 7, 7, 0, 12, 3, 3, 1], 1e-10)
    with pytest.raises(ValueError, match="FullAttention: cu_seqlens must start at 0"):
        twin(torch.randn(1, 10, 24, dtype=F64), cu_seqlens=torch.tensor([0, 4, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="FullAttention: with cu_seqlens, hidden_states must be a packed"):
        twin(torch.randn(2, 5, 24, dtype=F64), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [None, "cuda", "cpu"], ids=["batch", "packed", "packed-host-cu"])
def test_cuda_layer_matches_cpu(packed):
    """The layer on CUDA in bfloat16 (the CUDA kernels' head dims: D = Dv = 64) against the same
    weights on CPU in float64, on a batch or on packed sequences of odd lengths (some shorter
    than a compression block; cu_seqlens on the GPU or on the CPU): outputs and every parameter's gradient within bf16 noise (5e-2
    relative; the block selection may flip on near-ties in a few rows)."""
    torch.manual_seed(3)
    layer = nsa_torch.NativeSparseAttention(256, 8, 2, 64, block_size=32, block_stride=16,
                                            select_size=64, num_selected=4, window_size=128)
    lengths = [333, 17, 64, 0, 200, 31, 129]
    x = torch.randn(1, sum(lengths), 256, dtype=F64) if packed else torch.randn(2, 333, 256, dtype=F64)
    cu = cu_seqlens_of(lengths) if packed else None
    ref = layer.to(F64)
    y_ref = ref(x, cu_seqlens=cu)
    grads_ref = torch.autograd.grad(y_ref.square().mean(), list(ref.parameters()))
    gpu = make_twin(ref).to("cuda", torch.bfloat16)
    y = gpu(x.to("cuda", torch.bfloat16), cu_seqlens=None if cu is None else cu.to(packed))
    grads = torch.autograd.grad(y.float().square().mean(), list(gpu.parameters()))
    assert_close(y.double().cpu(), y_ref.detach(), 5e-2, "cuda layer output")
    for (n, _), g, r in zip(ref.named_parameters(), grads, grads_ref):
        assert_close(g.double().cpu(), r, 1e-1, f"cuda layer d{n}")


def test_attention_dtype_float32_on_cuda(monkeypatch):
    """The layer's attention runs in its projections' dtype, except float32 on CUDA (no kernel
    takes it): bfloat16, with one warning per process that says how to avoid the cast."""
    monkeypatch.setattr(modules, "_float32_cuda_warned", False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            assert modules._attention_dtype(dtype, cpu) == dtype
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            assert modules._attention_dtype(dtype, cuda) == dtype
    with pytest.warns(UserWarning, match=r"float32 on CUDA.*bfloat16.*torch\.autocast.*bfloat16"):
        assert modules._attention_dtype(torch.float32, cuda) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert modules._attention_dtype(torch.float32, cuda) == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("separate", [False, True], ids=["shared-kv", "separate-kv"])
def test_cuda_float32_layer_runs_in_bfloat16(separate, monkeypatch):
    """A float32 layer moved to the GPU: the attention runs in bfloat16 (one warning), the output
    is float32 and every float32 parameter gets its gradient, both within bf16 noise of the same
    weights in float64 on CPU. Under autocast nothing changes: no warning, bfloat16 output."""
    monkeypatch.setattr(modules, "_float32_cuda_warned", False)
    torch.manual_seed(5)
    layer = nsa_torch.NativeSparseAttention(256, 8, 2, 64, block_size=32, block_stride=16,
                                            select_size=64, num_selected=4, window_size=128,
                                            separate_branch_kv=separate)
    x = torch.randn(2, 333, 256, dtype=F64)
    ref = make_twin(layer).to(F64)
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref.square().mean(), list(ref.parameters()))
    gpu = layer.to("cuda")
    with pytest.warns(UserWarning, match="torch.autocast"):
        y = gpu(x.to("cuda", torch.float32))
    assert y.dtype == torch.float32
    grads = torch.autograd.grad(y.square().mean(), list(gpu.parameters()))
    assert_close(y.double().cpu(), y_ref.detach(), 5e-2, "float32 cuda layer output")
    for (n, _), g, r in zip(ref.named_parameters(), grads, grads_ref):
        assert g.dtype == torch.float32, f"d{n} dtype {g.dtype}"
        assert_close(g.double().cpu(), r, 1e-1, f"float32 cuda layer d{n}")
    monkeypatch.setattr(modules, "_float32_cuda_warned", False)
    with warnings.catch_warnings(), torch.autocast("cuda", dtype=torch.bfloat16):
        warnings.filterwarnings("error", message=".*float32 on CUDA")
        y_auto = gpu(x.to("cuda", torch.float32))
    assert y_auto.dtype == torch.bfloat16
    assert_close(y_auto.double().cpu(), y_ref.detach(), 5e-2, "autocast cuda layer output")


@pytest.mark.cuda
@pytest.mark.parametrize("cu_device", ["cuda", "cpu"])
def test_cuda_compile_packed_matches_eager(cu_device):
    """torch.compile of the layer on CUDA in bfloat16 on a packed batch = eager (inductor of
    torch 2.11 failed to lower the token positions' searchsorted on a slice of cu_seqlens)."""
    torch.manual_seed(4)
    layer = nsa_torch.NativeSparseAttention(256, 8, 2, 64, block_size=32, block_stride=16, select_size=64,
                                            num_selected=4, window_size=128).to("cuda", torch.bfloat16)
    x = torch.randn(1, 407, 256, device="cuda", dtype=torch.bfloat16)
    check_compiled_matches_eager(layer, x, cu_seqlens_of([200, 17, 0, 190]).to(cu_device), tol=5e-2)


def make_twin(layer):
    twin = nsa_torch.NativeSparseAttention.from_config(layer.config).to(next(layer.parameters()).dtype)
    twin.load_state_dict(layer.state_dict())
    return twin
