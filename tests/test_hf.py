"""nsa_torch.integrations.hf.replace_attention on tiny randomly initialised Hugging Face models:
structure and weight copy, a training step, equality with the original model when only the
window branch counts (proves the weight copy, the rotary convention and the packing agree with
transformers), separate branch K/V, decoding with NSAModelCache (greedy generate() against a full
recompute, left padding, beam search, a growing cache) and the refused inputs."""
import copy
import inspect
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import nsa_torch  # noqa: E402
from nsa_torch.integrations.hf import (  # noqa: E402
    NSAModelCache, NSASelfAttention, replace_attention)
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
    # plain forwards make no cache; generate() keeps its own (an NSAModelCache)
    assert model.config.use_cache is False and model.generation_config.use_cache is True
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
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 15)
    cache = generated_cache(out)
    assert isinstance(cache, NSAModelCache) and cache.layers[0].nsa_cache.dtype == torch.bfloat16


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
    # (the model makes its own DynamicCache)
    with pytest.raises(ValueError, match=r"replace_attention.*got a DynamicCache.*NSAModelCache"):
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


# ------------------------------------------------------------------------------------ decoding
# Small enough that a few dozen tokens cross compression windows (every 8 tokens from 15 on),
# selection blocks (every 16) and the window (32).
DECODE = dict(block_size=16, block_stride=8, select_size=16, num_selected=4, num_initial=1,
              num_local=1, window_size=32)
# The cache's name in a model's forward: `cache` in transformers 5, `past_key_values` before.
CACHE = ("cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters
         else "past_key_values")


@pytest.fixture
def decode_steps(monkeypatch):
    """The S of every decode_attention call (the layers' decoding steps)."""
    steps = []
    op = nsa_torch.functional.decode_attention

    def counted(q, *args, **kwargs):
        steps.append(q.shape[1])
        return op(q, *args, **kwargs)
    monkeypatch.setattr(nsa_torch.functional, "decode_attention", counted)
    return steps


def decoding_model(kind="llama", dtype=torch.float64, config=None, **nsa):
    """A converted tiny model with non-zero biases where it has any, generating to the end
    (no EOS)."""
    model = tiny_model(kind, **(config or {}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    replace_attention(model, nsa_kwargs={**DECODE, **nsa})
    model.generation_config.eos_token_id = None
    return model.to(dtype)


def generated_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def greedy_recompute(model, ids, n):
    """The greedy continuation of ids by a forward over the whole prefix at every step (no
    cache), and each step's last-token logits."""
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(n):
            last = model(seq, use_cache=False).logits[:, -1]
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq, logits


def assert_close_logits(got, want, tol):
    for i, (g, w) in enumerate(zip(got, want)):
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        assert err < tol, f"step {i}: relative error {err:.3g}"


@pytest.mark.parametrize("kind, prompt, new, nsa", [
    ("llama", 5, 45, {}),     # prompt < block_size; steps cross every kind of edge
    ("qwen2", 5, 45, {}),
    ("llama", 75, 20, {}),    # prompt over 4 selection blocks; steps cross 79 (cmp) and 80 (slc)
    ("qwen2", 75, 20, {}),
    ("llama", 30, 20, dict(separate_branch_kv=True, compression="linear")),
])
def test_generate_matches_recompute(decode_steps, kind, prompt, new, nsa):
    model = decoding_model(kind, **nsa)
    ids = input_ids(B=2, n=prompt)
    want, want_logits = greedy_recompute(model, ids, new)
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                         output_logits=True)
    assert torch.equal(out.sequences, want)
    assert_close_logits(out.logits, want_logits, 1e-6)  # (generate() returns them in float32)
    cache = generated_cache(out)
    assert isinstance(cache, NSAModelCache)
    # sized by generate (the last token is never fed), and every step decoded one token a layer
    assert cache.max_length == prompt + new - 1 == cache.get_seq_length()
    assert decode_steps == [1] * (2 * (new - 1))
    with torch.no_grad():  # generate(use_cache=False) recomputes: no decoding step
        recomputed = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(recomputed, want[:, :prompt + 4]) and len(decode_steps) == 2 * (new - 1)


def test_chunked_prefill(decode_steps):
    """generate(prefill_chunk_size=16): the first chunk prefills, the next ones are appended as
    16-token steps."""
    model = decoding_model("qwen2")
    ids = input_ids(B=2, n=50)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, prefill_chunk_size=16)
    assert torch.equal(out, greedy_recompute(model, ids, 10)[0])
    assert decode_steps[:4] == [16] * 4


def test_left_padded_batch_matches_each_prompt_alone():
    """Prompts of 7 and 20 tokens, left-padded to one batch: each row generates what it
    generates alone (the padding is left out of the cache; positions start at each prompt)."""
    model = decoding_model()
    short, long_ = input_ids(B=1, n=7, seed=2), input_ids(B=1, n=20, seed=3)
    ids = torch.cat([torch.cat([torch.zeros(1, 13, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(ids)
    mask[0, :13] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                         pad_token_id=0)
    for row, prompt in enumerate((short, long_)):
        alone, _ = greedy_recompute(model, prompt, 30)
        assert torch.equal(out[row, 20:], alone[0, prompt.shape[1]:]), f"row {row}"


def test_beam_search_matches_recompute():
    """Every beam and its score: beams change parents at most steps, so a cache that is not
    reordered gives other scores."""
    model = decoding_model()
    ids = input_ids(B=2, n=20)
    args = dict(max_new_tokens=12, num_beams=3, num_return_sequences=3, do_sample=False,
                return_dict_in_generate=True, output_scores=True)
    got, want = model.generate(ids, **args), model.generate(ids, use_cache=False, **args)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=0, atol=1e-6)


def test_forward_with_a_growing_cache(decode_steps):
    """A model called by hand with NSAModelCache() (no max_length): prefill, then a chunk of
    300 tokens that overflows the first allocation (the cache grows), then one token; the
    logits equal the full forward's rows."""
    model = decoding_model()
    ids = input_ids(B=2, n=341)
    cache = NSAModelCache()
    with torch.no_grad():
        want = model(ids).logits
        parts = [model(ids[:, a:b], **{CACHE: cache}, use_cache=True).logits
                 for a, b in ((0, 40), (40, 340), (340, 341))]
    assert_close_logits(torch.cat(parts, 1).unbind(1), want.unbind(1), 1e-9)
    assert decode_steps == [300, 300, 1, 1]
    assert cache.get_seq_length() == 341 and cache.layers[1].nsa_cache.capacity == 2 * (40 + 256)
    cache.reset()  # empty again: the next call prefills, with another batch size
    with torch.no_grad():
        again = model(ids[:1, :40], **{CACHE: cache}, use_cache=True).logits
    assert torch.equal(again, parts[0][:1])


def test_generate_continues_from_its_cache(decode_steps):
    """A second generate() on the first one's sequences and cache feeds only the tokens the
    cache lacks (a chunk of 6: the last generated token and 5 new ones), growing the cache past
    the first call's max_length; the result equals a recompute of the whole."""
    model = decoding_model()
    ids = input_ids(B=2, n=30)
    first = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
    cache = generated_cache(first)
    more = torch.cat([first.sequences, input_ids(B=2, n=5, seed=4)], 1)
    out = model.generate(more, **{CACHE: cache}, max_new_tokens=20, do_sample=False)
    want, _ = greedy_recompute(model, more, 20)
    assert torch.equal(out, want)
    assert decode_steps[2 * 9:2 * 10] == [6, 6]
    assert cache.get_seq_length() == 64 and cache.layers[0].nsa_cache.capacity == 2 * 39


def test_cache_refusals():
    model = decoding_model()
    ids = input_ids(B=2, n=40)

    def call(x, cache, **kw):
        with torch.no_grad():
            return model(x, **{CACHE: cache}, use_cache=True, **kw)

    with pytest.raises(ValueError, match=r"got a DynamicCache.*NSAModelCache"):
        call(ids, transformers.DynamicCache())
    with pytest.raises(ValueError, match=r"cache_implementation='static'.*not supported"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(ValueError, match=r"holds 40 tokens per sequence and gets 1 more, but it "
                                         r"has room for 40 \(NSAModelCache\(max_length=40, "
                                         r"grow=False"):
        cache = NSAModelCache(max_length=40, grow=False)
        call(ids, cache)
        call(ids[:, :1], cache)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        NSAModelCache(max_length=0)

    cache = NSAModelCache()
    call(ids, cache)
    with pytest.raises(ValueError, match="holds 2 sequences, got a batch of 3"):
        call(input_ids(B=3, n=1), cache)
    with pytest.raises(ValueError, match=r"position_ids must continue each cached sequence.*"
                                         r"should be \[40\].*got \[0\]"):
        call(ids[:, :1], cache, position_ids=torch.zeros(2, 1, dtype=torch.long))
    mask = torch.ones(2, 41, dtype=torch.long)
    mask[1, 3] = 0
    with pytest.raises(ValueError, match="the attention_mask does not match the cache"):
        call(ids[:, :1], cache, attention_mask=mask)
    with pytest.raises(ValueError, match="NSAModelCache: layer 0: removing 1 tokens"):
        cache.crop(-1)
    cache.crop(0)  # removes nothing: fine (transformers 5 calls it so)
    with pytest.raises(ValueError, match="batch_repeat_interleave is not supported"):
        cache.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match="layer 0 is not an NSA layer"):
        cache.update(torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16), 0)
    with pytest.raises(ValueError, match=r"the cache holds torch.float64, the layer's attention "
                                         r"runs in torch.float32"):
        model.float()
        call(ids[:, :1], cache)
    model.double()
    other = decoding_model(block_size=32, block_stride=16)  # same shapes, other NSA layers
    with pytest.raises(ValueError, match=r"built for another layer: block_size"):
        with torch.no_grad():
            other(ids[:, :1], **{CACHE: cache}, use_cache=True)

    packed = torch.tensor([list(range(20)) * 2])
    with pytest.raises(ValueError, match="packed sequences are not supported"):
        call(ids[:1], NSAModelCache(), position_ids=packed)
    right = torch.ones_like(ids)
    right[0, -3:] = 0
    with pytest.raises(ValueError, match="may only mask the leading tokens of a prompt.*row 0 "
                                         "masks 3"):
        call(ids, NSAModelCache(), attention_mask=right)
    empty = torch.ones_like(ids)
    empty[1] = 0
    with pytest.raises(ValueError, match="row 1 masks 40 of its 40"):
        call(ids, NSAModelCache(), attention_mask=empty)


def check_bf16_generation(kind, device):
    """Greedy generate() of a bf16 model on `device` with its NSAModelCache against the float64
    CPU model's teacher-forced logits of the same tokens (and the bf16 model's own full
    recompute): logits to bf16 accuracy, and the same tokens wherever the float64 logits do not
    nearly tie. head_dim 64: a head dim the CUDA kernels take."""
    prompt, new = 75, 40
    cpu = decoding_model(kind, config=dict(head_dim=64))
    model = copy.deepcopy(cpu).to(device, torch.bfloat16)
    ids = input_ids(B=2, n=prompt)
    out = model.generate(ids.to(device), max_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    assert isinstance(generated_cache(out), NSAModelCache)
    seq = out.sequences.cpu()
    got = torch.stack(out.logits, 1).cpu().double()  # [B, new, vocab]: step i's logits
    with torch.no_grad():
        want = cpu(seq[:, :-1]).logits[:, prompt - 1:]
        own = model(out.sequences[:, :-1], use_cache=False).logits[:, prompt - 1:].cpu().double()
    for ref, tol in ((own, 2e-2), (want, 5e-2)):
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < tol, f"relative error {err:.3g}"
    top2 = want.topk(2, -1).values
    clear = top2[..., 0] - top2[..., 1] > 0.1 * want.std(-1)
    assert clear.double().mean() > 0.25  # (the token check below is not empty)
    assert torch.equal(seq[:, prompt:][clear], want.argmax(-1)[clear])


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_generate_bf16(kind):
    check_bf16_generation(kind, "cuda")


@pytest.mark.cuda
def test_cuda_left_padded_batch_bf16():
    """A left-padded bf16 batch on the GPU (its prompts prefilled packed into the cache): each
    row's logits at every step equal those of a full recompute of that row alone."""
    model = decoding_model(dtype=torch.bfloat16, config=dict(head_dim=64)).cuda()
    prompts = input_ids(B=1, n=7, seed=2), input_ids(B=1, n=40, seed=3)
    ids = torch.cat([torch.cat([torch.zeros(1, 33, dtype=torch.long), prompts[0]], 1), prompts[1]])
    mask = torch.ones_like(ids)
    mask[0, :33] = 0
    out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=30,
                         do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                         output_logits=True)
    got = torch.stack(out.logits, 1).double()  # [B, 30, vocab]
    for row, prompt in enumerate(prompts):
        seq = torch.cat([prompt.cuda(), out.sequences[row:row + 1, 40:-1]], 1)
        with torch.no_grad():
            want = model(seq, use_cache=False).logits[0, prompt.shape[1] - 1:].double()
        err = ((got[row] - want).norm() / want.norm()).item()
        assert err < 2e-2, f"row {row}: relative error {err:.3g}"
