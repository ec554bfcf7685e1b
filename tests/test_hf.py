"""nsa_torch.integrations.hf.replace_attention on tiny randomly initialised Hugging Face models:
structure and weight copy, a training step, equality with the original model when only the
window branch counts (proves the weight copy, the rotary convention and the packing agree with
transformers), separate branch K/V, and the refused inputs."""
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import nsa_torch  # noqa: E402
from nsa_torch.integrations.hf import NSASelfAttention, replace_attention  # noqa: E402
from helpers import count_calls  # noqa: E402

# Small NSA hyper-parameters so that every branch matters at T = 50.
SMALL = dict(block_size=8, block_stride=4, select_size=16, num_selected=4, num_initial=1,
             num_local=1, window_size=16)
T = 50
HQ = 4


def tiny_model(kind="llama", attn_implementation="eager", seed=0, **config):
    torch.manual_seed(seed)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    cfg = cfg_cls(hidden_size=64, num_attention_heads=HQ, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=100, intermediate_size=96,
                  max_position_embeddings=512, attn_implementation=attn_implementation, **config)
    return model_cls(cfg).eval()


def input_ids(B=2, n=T, seed=1):
    return torch.randint(0, 100, (B, n), generator=torch.Generator().manual_seed(seed))


def nsa_layers(model):
    return [layer.self_attn.nsa for layer in model.model.layers]


def old_projections(model):
    return [{n: (getattr(layer.self_attn, n).weight.detach().clone(),
                 getattr(layer.self_attn, n).bias)
             for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
            for layer in model.model.layers]


def window_only(model):
    """Gates of every NSA layer forced to (0, 0, 1): g_proj's 3 * HQ outputs are the cmp, slc
    and swa gates in that order."""
    with torch.no_grad():
        for nsa in nsa_layers(model):
            nsa.g_proj.weight.zero_()
            nsa.g_proj.bias.copy_(torch.tensor([-30.0] * (2 * HQ) + [30.0] * HQ))


def test_replace_structure_weights_and_training_step():
    model = tiny_model()
    olds = old_projections(model)
    assert replace_attention(model, nsa_kwargs=SMALL) is model
    assert model.config.use_cache is False and model.generation_config.use_cache is False
    for layer, old in zip(model.model.layers, olds):
        assert isinstance(layer.self_attn, NSASelfAttention)
        nsa = layer.self_attn.nsa
        assert isinstance(nsa, nsa_torch.NativeSparseAttention)
        assert (nsa.config.window_size, nsa.config.head_dim, nsa.config.bias) == (16, 16, False)
        for name, (weight, _) in old.items():
            assert torch.equal(getattr(nsa, name).weight, weight), name

    model.train()
    ids = input_ids()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, T, 100)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for i, nsa in enumerate(nsa_layers(model)):
        for name, p in nsa.named_parameters():
            assert p.grad is not None, f"layer {i}: {name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"layer {i}: {name}"
        # the gates and the compression's first path are live (fc2 starts at zero, so fc1 and
        # pos get zero gradients at initialisation, but they are reached)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "k_compress.fc2"):
            assert nsa.get_submodule(name).weight.grad.abs().sum() > 0, f"layer {i}: {name}"


@pytest.mark.parametrize("kind, separate, config", [
    ("llama", False, dict(rope_theta=500.0)),  # a non-default theta must reach the NSA layer
    ("llama", True, dict(attention_bias=True)),
    ("qwen2", False, {}),  # q/k/v biases, no o_proj bias, no config.attention_bias
])
def test_matches_hf_when_only_the_window_counts(kind, separate, config):
    model = tiny_model(kind, **config)
    if config.get("attention_bias") or kind == "qwen2":  # non-zero biases to copy
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.normal_(0, 0.2)
    ids = input_ids()
    packed = torch.tensor([list(range(20)) + list(range(T - 20))])  # two sequences in one row
    with torch.no_grad():
        ref = model(ids).logits
        # transformers runs packed rows as separate sequences only without a cache
        ref_packed = model(ids[:1], position_ids=packed, use_cache=False).logits
    replace_attention(model, nsa_kwargs={**SMALL, "window_size": 64,
                                         "separate_branch_kv": separate})
    window_only(model)
    with torch.no_grad():
        out = model(ids).logits
        out_packed = model(ids[:1], position_ids=packed).logits
    for got, want in ((out, ref), (out_packed, ref_packed)):
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-4, f"relative error {err:.3g}"
    # the packed row is really two sequences: the second one's logits ignore the first one
    assert not torch.allclose(out_packed[:, 20:], out[:1, 20:], atol=1e-3)


def test_separate_branch_kv_copies_k_v_into_every_branch():
    model = tiny_model()
    olds = old_projections(model)
    replace_attention(model, nsa_kwargs={**SMALL, "separate_branch_kv": True})
    for nsa, old in zip(nsa_layers(model), olds):
        assert not hasattr(nsa, "k_proj")
        for branch in ("cmp", "slc", "swa"):
            assert torch.equal(getattr(nsa, f"k_proj_{branch}").weight, old["k_proj"][0])
            assert torch.equal(getattr(nsa, f"v_proj_{branch}").weight, old["v_proj"][0])
    ids = input_ids()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_dtype_and_generate():
    model = tiny_model().to(torch.bfloat16)
    replace_attention(model, nsa_kwargs=SMALL)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = input_ids(B=1, n=12)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # use_cache=False by default
    assert out.shape == (1, 15)


class NoProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self.self_attn, name, nn.Linear(4, 4))


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(4, 4)), r"replace_attention: expected a Hugging Face Llama-style.*"
                                     r"got a Sequential"),
    (NoProjections(), r"self_attn lacks \['o_proj'\]"),
])
def test_model_without_projections(model, match):
    with pytest.raises(ValueError, match=match):
        replace_attention(model)


def test_argument_errors(monkeypatch):
    with pytest.raises(TypeError, match="replace_attention: expected a torch.nn.Module"):
        replace_attention("llama")
    model = tiny_model()
    with pytest.raises(TypeError, match="unknown NSA argument 'windw_size'"):
        replace_attention(model, nsa_kwargs=dict(windw_size=8))
    with pytest.raises(TypeError, match="cannot set 'head_dim'"):
        replace_attention(model, nsa_kwargs=dict(head_dim=8))
    with pytest.raises(ValueError, match=r"nsa_torch.NSAConfig: block_size \(6\) must be a "
                                         r"multiple of block_stride"):
        replace_attention(model, nsa_kwargs=dict(block_size=6, block_stride=4))
    monkeypatch.setattr(model.config, "num_key_value_heads", 3)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of "
                                         r"num_key_value_heads \(3\)"):
        replace_attention(model)
    monkeypatch.undo()
    assert all(not isinstance(layer.self_attn, NSASelfAttention)  # nothing half-replaced
               for layer in model.model.layers)
    replace_attention(model, nsa_kwargs=SMALL)
    with pytest.raises(ValueError, match="already an NSASelfAttention"):
        replace_attention(model)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install transformers"):
        replace_attention(tiny_model())


def test_rope_scaling_warns():
    rope = dict(rope_type="linear", rope_theta=10000.0, factor=2.0)
    with pytest.warns(UserWarning, match="rope_type='linear'"):
        replace_attention(tiny_model(rope_parameters=rope), nsa_kwargs=SMALL)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_refused_inputs(attn_implementation):
    model = replace_attention(tiny_model(attn_implementation=attn_implementation),
                              nsa_kwargs=SMALL)
    ids = input_ids()
    mask = torch.ones_like(ids)
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()  # nothing masked: fine
    mask[0, :3] = 0
    with pytest.raises(ValueError, match=r"replace_attention.*padding is not supported"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"replace_attention.*KV-cache decoding is not "
                                         r"supported.*use_cache=False"):
        model(ids, use_cache=True)
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]]).expand(2, 6)
    with pytest.raises(ValueError, match="need batch size 1"):
        model(ids[:, :6], position_ids=packed)


def test_mask_and_packing_found_once_per_forward(monkeypatch):
    """Every layer gets the same attention_mask and position_ids: the padding check and the
    packed lengths (each a wait for the device on a GPU) run once per forward, not per layer,
    and again when the tensors change in place."""
    from nsa_torch.integrations import hf
    calls = {"mask": 0, "packed": 0}
    count_calls(monkeypatch, calls, hf, "_check_mask", "mask")
    count_calls(monkeypatch, calls, hf, "_packed_cu_seqlens", "packed")
    model = replace_attention(tiny_model(), nsa_kwargs=SMALL)  # (2 layers)
    ids = input_ids(B=1)
    mask = torch.ones_like(ids)
    packed = torch.tensor([list(range(20)) + list(range(T - 20))])
    with torch.no_grad():
        first = model(ids, attention_mask=mask, position_ids=packed).logits
        assert calls == {"mask": 1, "packed": 1}
        again = model(ids, attention_mask=mask, position_ids=packed).logits
        # (transformers builds a new 4D mask each forward; the position_ids are the same tensor)
        assert calls == {"mask": 2, "packed": 1} and torch.equal(first, again)
        packed[0, 20:] += 20  # one sequence now: found again, and it changes the output
        whole = model(ids, attention_mask=mask, position_ids=packed).logits
        assert calls["packed"] == 2 and not torch.allclose(whole, first, atol=1e-3)
        mask[0, 0] = 0  # padding now: refused, though the mask object was checked before
        with pytest.raises(ValueError, match="padding is not supported"):
            model(ids, attention_mask=mask, position_ids=packed)


def test_inference_mode():
    """Under torch.inference_mode the mask and position_ids are inference tensors, which keep no
    version to key the once-per-forward findings on: they are found at every layer instead."""
    model = replace_attention(tiny_model(), nsa_kwargs=SMALL)
    ids = input_ids(B=1)
    with torch.no_grad():
        want = model(ids, attention_mask=torch.ones_like(ids),
                     position_ids=torch.tensor([list(range(20)) + list(range(T - 20))])).logits
    with torch.inference_mode():
        got = model(ids, attention_mask=torch.ones_like(ids),
                    position_ids=torch.tensor([list(range(20)) + list(range(T - 20))])).logits
    assert torch.equal(got, want)
