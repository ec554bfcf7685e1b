"""Native Sparse Attention in Hugging Face Llama-style causal LMs.

    from transformers import AutoModelForCausalLM
    from nsa_torch.integrations.hf import replace_attention

    model = AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.bfloat16)
    model = replace_attention(model, nsa_kwargs=dict(window_size=512))
    loss = model(input_ids, labels=input_ids).loss    # unpadded batches (or packed, see below)
    out = model.generate(input_ids, max_new_tokens=64)  # decodes with the NSA KV cache

Every decoder layer's `self_attn` becomes an NSASelfAttention holding a
nsa_torch.NativeSparseAttention (`.nsa`) that starts from the layer's q/k/v/o projections.

Decoding: generate() gets an NSAModelCache (hf_cache.py: one nsa_torch.NSACache per layer, sized
to generate's max_length) from a hook that replace_attention sets on the model
(`_prepare_cache_for_generation`, where transformers makes its default cache); the first step
prefills every layer's cache, each next one appends a token and runs the decode op. Nothing to
pass; to drive the model by hand, pass cache=NSAModelCache() (past_key_values= in transformers
4.x) with use_cache=True. Greedy, sampling and beam search work, as do left-padded prompt
batches; transformers' own caches (DynamicCache, cache_implementation="static") and assisted
generation are refused. A plain forward makes no cache (config.use_cache is set to False).
Supported: transformers 4.56 to 5.x (tested with 4.57 and 5.25). transformers is imported only
when replace_attention is called or NSAModelCache is first used.
"""
import inspect
import types
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn
from ..modules import NativeSparseAttention, NSAConfig, _once_per_tensor

_WHERE = "nsa_torch.integrations.hf.replace_attention"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Set from the model's config; nsa_kwargs may set every other NSAConfig field.
_SHAPE_FIELDS = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "v_head_dim")
_NSA_FIELDS = tuple(f for f in NSAConfig.__dataclass_fields__ if f not in _SHAPE_FIELDS)


class NSASelfAttention(nn.Module):
    """Drop-in for a Hugging Face decoder layer's `self_attn`: runs `self.nsa`
    (a NativeSparseAttention) and returns `(attn_output, None)` as the HF attention does.

    Called like transformers' LlamaAttention: forward(hidden_states, position_embeddings,
    attention_mask, cache, **kwargs) (the cache is `past_key_values` in transformers 4.x). NSA
    applies its own rotary embedding, so position_embeddings is ignored.

    Without a cache (training, scoring, generate(use_cache=False)): positions come from
    position_ids, else cache_position, else 0..T-1. Position ids that do not step by 1 inside a
    row (HF's padding-free packing, e.g. DataCollatorWithFlattening) mark packed sequences, which
    run as a varlen batch (batch size 1). Attention masks that mask out tokens are refused.

    With an NSAModelCache (generate() makes one): the first call prefills this layer's NSACache
    in it, the next ones append to every sequence; positions continue each cached sequence
    (position_ids, where given, must agree). A left-padded prompt batch (each row's masked tokens
    all before its first real one, as tokenizers with padding_side="left" make) is prefilled as
    packed sequences: each starts at position 0, as if alone.

    Refused with a ValueError: any other cache (DynamicCache, StaticCache hold plain keys and
    values), masks that hide tokens other than that left padding, and packed sequences with a
    cache. Causal masks, and the block-causal masks of packed sequences, are accepted and
    otherwise ignored: NSA is causal by construction. Masks given as flex-attention BlockMasks
    are not inspected.
    """

    def __init__(self, nsa, layer_idx=None):
        super().__init__()
        self.nsa = nsa
        self.layer_idx = layer_idx
        self.is_causal = True

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                *, position_ids=None, cache_position=None, past_key_values=None,
                past_key_value=None, use_cache=None, **kwargs):
        where = f"{_WHERE} (NSASelfAttention of layer {self.layer_idx})"
        B, T = hidden_states.shape[:2]
        given = position_ids if position_ids is not None else cache_position
        positions = None
        if given is not None:
            positions = given[None] if given.dim() == 1 else given
            if positions.shape[-1] != T or positions.shape[0] not in (1, B):
                raise ValueError(f"{where}: position_ids must be [T], [1, T] or [B, T] with B, T = "
                                 f"{B}, {T}, got {list(positions.shape)}")
        past = next((p for p in (cache, past_key_values, past_key_value) if p is not None), None)
        if past is not None:
            return self._forward_cached(where, past, hidden_states, attention_mask, given,
                                        positions), None
        if torch.is_tensor(attention_mask):
            _once_per_tensor(attention_mask, ("mask", B, T), lambda m: _check_mask(where, m, T))
        cu_seqlens = None
        if positions is None:  # (0..T-1: nothing packed)
            positions = torch.arange(T, device=hidden_states.device)[None]
        else:
            positions = positions.to(device=hidden_states.device, dtype=torch.int64)
            cu_seqlens = _once_per_tensor(given, ("cu_seqlens", B, T),
                                          lambda _: _packed_cu_seqlens(where, positions, B))
        out = self.nsa(hidden_states, cu_seqlens=cu_seqlens, position_ids=positions.expand(B, T))
        return out, None

    def _forward_cached(self, where, past, x, mask, given, positions):
        """forward with an NSAModelCache: prefill this layer's NSACache, or append to it."""
        from .hf_cache import NSAModelCache
        if not isinstance(past, NSAModelCache):
            raise ValueError(
                f"{where}: got a {type(past).__name__}, which holds plain attention keys and "
                "values; an NSA layer keeps its state in an nsa_torch.integrations.hf."
                "NSAModelCache. generate() makes one by itself (leave cache_implementation "
                "unset); in a forward call pass cache=NSAModelCache() (past_key_values= in "
                "transformers 4.x), or no cache (use_cache=False)")
        if self.layer_idx is None:
            raise ValueError(f"{where}: the layer has no layer_idx, which an NSAModelCache needs")
        B, T = x.shape[:2]
        entry = past.layer(self.layer_idx)
        prefill = entry.seen == 0
        c = past.nsa_cache_for(where, self.layer_idx, self.nsa, x, B, T)
        lengths = [0] * B if prefill else list(c.lengths)
        rows = None
        if torch.is_tensor(mask):
            rows = _once_per_tensor(mask, ("rows", B, T), lambda m: _mask_rows(where, m, T))
        pads = [0] * B if rows is None else rows.pads
        if rows is not None:
            _check_cached_mask(where, rows, prefill, lengths, T)
        if positions is not None:
            _once_per_tensor(given, ("cache positions", B, T, tuple(lengths), tuple(pads)),
                             lambda _: _check_positions(where, positions, lengths, pads))
        if any(pads):  # (a left-padded prompt: its real tokens, packed)
            index, cu_seqlens = _once_per_tensor(mask, ("packed", B, T, x.device),
                                                 lambda _: _left_packing(pads, T, x.device))
            packed = x.reshape(B * T, -1).index_select(0, index)[None]
            y = self.nsa(packed, cu_seqlens=cu_seqlens, cache=c)[0]
            out = y.new_zeros(B * T, y.shape[-1]).index_copy_(0, index, y).view(B, T, -1)
        else:
            out = self.nsa(x, cache=c)
        entry.seen += T
        return out


def _mask_allowed(where, mask, T):
    """Which of the T new tokens the mask lets see themselves ([B, T] bool), and how many keys
    the last one sees ([B]), from a [B, S] mask or a 4D [B, 1, T, S] one (bool: True = attend;
    float: additive, large negative = masked). Causal, sliding-window and block-causal (packed)
    masks always let a token see itself, padding never does."""
    if mask.dim() == 2:
        allowed = mask != 0
        return allowed[:, -T:], allowed.sum(-1)
    if mask.dim() == 4:
        if mask.dtype.is_floating_point:
            allowed = mask[:, 0] > torch.finfo(mask.dtype).min / 2
        else:
            allowed = mask[:, 0] != 0
        diag = torch.diagonal(allowed, offset=mask.shape[-1] - T, dim1=-2, dim2=-1)
        return diag, allowed[:, -1].sum(-1)
    raise ValueError(f"{where}: attention_mask must be None, 2D [B, S] or 4D [B, 1, T, S], "
                     f"got {list(mask.shape)}")


def _check_mask(where, mask, T):
    """Refuse masks that hide tokens (padding), without a cache."""
    if not bool(_mask_allowed(where, mask, T)[0].all()):
        raise ValueError(
            f"{where}: padding is not supported without a cache, got an attention_mask that "
            "masks out tokens; NSA is causal by construction and takes no mask. Pass unpadded "
            "batches (all sequences of one length), or pack sequences into one row with "
            "position_ids restarting at 0 for each sequence (generate() with its default "
            "NSAModelCache takes left-padded batches)")


class _MaskRows(NamedTuple):
    """What a mask says of each row of a call with a cache (host values, read once per mask)."""

    pads: list     # new tokens masked out
    left: list     # whether all of them come before the row's first real token
    visible: list  # keys the row's last new token sees


def _mask_rows(where, mask, T):
    allowed, visible = _mask_allowed(where, mask, T)
    left = (allowed[:, 1:] >= allowed[:, :-1]).all(-1)  # (no real token before a masked one)
    pads, left, visible = torch.stack(((~allowed).sum(-1), left.long(), visible)).tolist()
    return _MaskRows(pads, [bool(x) for x in left], visible)


def _check_cached_mask(where, rows, prefill, lengths, T):
    """With a cache, masks may only hide the left padding of a prompt: in the prefill, the
    leading tokens of a row (never all of them); afterwards, the same keys again."""
    if prefill:
        bad = [b for b, (p, left) in enumerate(zip(rows.pads, rows.left)) if p and not left]
        if bad or T in rows.pads:
            b = bad[0] if bad else rows.pads.index(T)
            raise ValueError(
                f"{where}: with a cache, an attention_mask may only mask the leading tokens of a "
                f"prompt (left padding, tokenizer padding_side='left'), and not all of them; row "
                f"{b} masks {rows.pads[b]} of its {T} tokens otherwise")
        return
    if any(rows.pads):
        b = next(b for b, p in enumerate(rows.pads) if p)
        raise ValueError(f"{where}: with a cache, the new tokens after the prompt cannot be "
                         f"padding, got an attention_mask that masks {rows.pads[b]} of the {T} "
                         f"new tokens of row {b}")
    want = [n + T for n in lengths]
    if rows.visible != want:
        raise ValueError(f"{where}: the attention_mask does not match the cache: its last row "
                         f"lets each sequence see {rows.visible} tokens, the cache holds "
                         f"{lengths} real tokens plus the {T} new ones (pass the prompt's mask "
                         "extended by ones, as generate() does)")


def _check_positions(where, positions, lengths, pads):
    """position_ids (where given) must continue each cached sequence: the j-th real new token of
    row b sits at lengths[b] + j (padding positions are not read)."""
    B, T = len(lengths), positions.shape[-1]
    got = positions.detach().to("cpu", torch.int64).expand(B, T)
    for b, (n, p) in enumerate(zip(lengths, pads)):
        want = torch.arange(n, n + T - p)
        if not torch.equal(got[b, p:], want):
            raise ValueError(
                f"{where}: with a cache, position_ids must continue each cached sequence (the "
                f"cache sets the positions; packed sequences are not supported): row {b} should "
                f"be {_shown(want)} after {p} padding tokens, got {_shown(got[b, p:])}")
    return True


def _shown(t):
    t = t.tolist()
    return str(t) if len(t) <= 8 else f"[{t[0]}, {t[1]}, ..., {t[-1]}] ({len(t)} values)"


def _left_packing(pads, T, device):
    """The real tokens of a left-padded batch [B, T], packed: their flat indices (on device) and
    cu_seqlens (int32, on the CPU)."""
    index = torch.cat([torch.arange(b * T + p, (b + 1) * T) for b, p in enumerate(pads)])
    cu = torch.tensor([0] + [T - p for p in pads]).cumsum(0).to(torch.int32)
    return index.to(device), cu


def _packed_cu_seqlens(where, position_ids, B):
    """cu_seqlens (int32, on the CPU: the layers read the lengths there) of the sequences packed
    in one row, found where position_ids does not step by 1 (as transformers finds packed
    sequences); None when nothing is packed."""
    if position_ids.shape[-1] < 2:
        return None
    breaks = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if not bool(breaks.any()):
        return None
    if B != 1:
        raise ValueError(f"{where}: packed sequences (position_ids that restart inside a row) "
                         f"need batch size 1, got B = {B}")
    T = position_ids.shape[-1]
    starts = breaks[0].nonzero().flatten() + 1
    edge = starts.new_tensor([0]), starts, starts.new_tensor([T])
    return torch.cat(edge).to(device="cpu", dtype=torch.int32)


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{_WHERE} needs Hugging Face transformers: pip install transformers "
                          f"({err})") from err


def _find_attentions(model):
    """(parent, old self_attn, qualified name) of every `self_attn` with the four projections;
    raises when there is none."""
    found, partial = [], []
    for name, module in model.named_modules():
        attn = getattr(module, "self_attn", None)
        if not isinstance(attn, nn.Module):
            continue
        if isinstance(attn, NSASelfAttention):
            raise ValueError(f"{_WHERE}: {name or 'the model'}.self_attn is already an "
                             "NSASelfAttention; call replace_attention once per model")
        missing = [p for p in _PROJECTIONS if not isinstance(getattr(attn, p, None), nn.Linear)]
        if missing:
            partial.append(f"{name}.self_attn lacks {missing}")
        else:
            found.append((module, attn, f"{name}.self_attn" if name else "self_attn"))
    if not found:
        seen = f"; found {', '.join(partial[:3])}" if partial else ""
        raise ValueError(
            f"{_WHERE}: expected a Hugging Face Llama-style model (e.g. LlamaForCausalLM, "
            "MistralForCausalLM, Qwen2ForCausalLM) whose decoder layers have `self_attn` with "
            f"nn.Linear {', '.join(_PROJECTIONS)}, got a {type(model).__name__} without any{seen}")
    return found


def _rope_theta(config):
    """rope_theta of a transformers config (rope_parameters in recent versions, rope_theta in
    older ones); warns when the model scales its rotary embedding, which NSA does not."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = params if isinstance(params, Mapping) else {}
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if kind != "default" or partial != 1.0:
        warnings.warn(f"{_WHERE}: the model's rotary embedding is rope_type={kind!r}, "
                      f"partial_rotary_factor={partial}; NativeSparseAttention applies the plain "
                      "one (every dimension, theta only), so positions are encoded differently",
                      stacklevel=4)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{_WHERE}: found no rope_theta in the model config (neither "
                         "config.rope_parameters['rope_theta'] nor config.rope_theta); pass "
                         "nsa_kwargs=dict(rope_theta=...)")
    return float(theta)


def _nsa_config(model, nsa_kwargs, olds):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()  # the language model's config in multimodal models
    names = ("hidden_size", "num_attention_heads")
    if config is None or any(getattr(config, n, None) is None for n in names):
        raise ValueError(f"{_WHERE}: expected model.config (a transformers config) with "
                         f"{', '.join(names)}, got {type(config).__name__}")
    hidden, HQ = config.hidden_size, config.num_attention_heads
    H = getattr(config, "num_key_value_heads", None) or HQ  # unset in configs without GQA
    if HQ % H:
        raise ValueError(f"{_WHERE}: num_attention_heads ({HQ}) must be a multiple of "
                         f"num_key_value_heads ({H})")
    D = getattr(config, "head_dim", None)
    if D is None:
        if hidden % HQ:
            raise ValueError(f"{_WHERE}: without config.head_dim, hidden_size ({hidden}) must be a "
                             f"multiple of num_attention_heads ({HQ})")
        D = hidden // HQ
    if getattr(config, "attention_dropout", 0.0):
        warnings.warn(f"{_WHERE}: config.attention_dropout = {config.attention_dropout} is "
                      "ignored (NativeSparseAttention has no attention dropout)", stacklevel=3)

    nsa_kwargs = dict(nsa_kwargs or {})
    for key in nsa_kwargs:
        if key in _SHAPE_FIELDS:
            raise TypeError(f"{_WHERE}: nsa_kwargs cannot set {key!r}, it comes from the model "
                            "config")
        if key not in _NSA_FIELDS:
            raise TypeError(f"{_WHERE}: unknown NSA argument {key!r} in nsa_kwargs; expected some "
                            f"of {', '.join(_NSA_FIELDS)}")
    if "rope_theta" not in nsa_kwargs:
        nsa_kwargs["rope_theta"] = _rope_theta(config)
    if "bias" not in nsa_kwargs:
        # Qwen2 has q/k/v biases but no o_proj bias and no config.attention_bias: follow the
        # weights too (a new bias without an old one starts at zero).
        has_bias = any(getattr(a, p).bias is not None for _, a, _ in olds for p in _PROJECTIONS)
        nsa_kwargs["bias"] = bool(getattr(config, "attention_bias", False)) or has_bias
    return NSAConfig(hidden, HQ, H, D, D, **nsa_kwargs)


def _check_shapes(cfg, olds, copy_weights):
    """Every old projection must have the shape the config gives (and, to be copied, no bias
    that the new layer would lose); checked before any layer is replaced."""
    hidden, HQ, H, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    expected = dict(q_proj=(HQ * D, hidden), k_proj=(H * D, hidden), v_proj=(H * D, hidden),
                    o_proj=(hidden, HQ * D))
    for _, old, name in olds:
        for p, shape in expected.items():
            lin = getattr(old, p)
            if tuple(lin.weight.shape) != shape:
                raise ValueError(f"{_WHERE}: {name}.{p}.weight is {list(lin.weight.shape)}, "
                                 f"expected {list(shape)} from the model config (hidden_size "
                                 f"{hidden}, {HQ} heads, {H} KV heads, head_dim {D})")
            if copy_weights and lin.bias is not None and not cfg.bias:
                raise ValueError(f"{_WHERE}: {name}.{p} has a bias, but nsa_kwargs sets "
                                 "bias=False")


def _prepare_cache_for_generation(self, *args, **kwargs):
    """generate()'s cache preparation for a converted model (replace_attention sets it on the
    model): an NSAModelCache sized to generate's max_length where transformers would make its
    default cache; a cache the caller passes goes through transformers' own checks. Found by
    name among the arguments (model_kwargs, generation_config, max_cache_length), which
    transformers 4.56 to 5.x share."""
    from .hf_cache import NSAModelCache
    prepare = type(self)._prepare_cache_for_generation
    args_of = inspect.signature(prepare).bind(self, *args, **kwargs).arguments
    config, model_kwargs = args_of["generation_config"], args_of["model_kwargs"]
    if (model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None
            or config.use_cache is False):
        return prepare(self, *args, **kwargs)
    if config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"{_WHERE}: generate(cache_implementation="
                         f"{config.cache_implementation!r}) is not supported: a converted model "
                         "decodes with an NSAModelCache, which generate() makes when "
                         "cache_implementation is unset")
    key = "cache" if "cache" in inspect.signature(self.forward).parameters else "past_key_values"
    model_kwargs[key] = NSAModelCache(max_length=args_of.get("max_cache_length"))


def _copy_linear(new, old):
    new.weight.copy_(old.weight)
    if new.bias is not None:  # a bias the old layer lacks starts at zero: same function
        if old.bias is None:
            new.bias.zero_()
        else:
            new.bias.copy_(old.bias)


def replace_attention(model, *, nsa_kwargs=None, copy_weights=True):
    """Replace the attention of a Hugging Face Llama-style causal LM by Native Sparse Attention.

    Every module's `self_attn` that has nn.Linear q_proj, k_proj, v_proj and o_proj (the decoder
    layers of LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, ...) becomes an
    NSASelfAttention whose `.nsa` is a nsa_torch.NativeSparseAttention built from the model
    config: hidden_size, num_attention_heads, num_key_value_heads, head_dim (config.head_dim,
    else hidden_size // num_attention_heads), rope_theta (config.rope_parameters["rope_theta"]
    or config.rope_theta) and bias (config.attention_bias, or any old projection having a bias).
    nsa_kwargs (a dict) overrides the other NativeSparseAttention arguments: block_size,
    block_stride, select_size, num_selected, num_initial, num_local, window_size, compression,
    rope_theta, separate_branch_kv, bias.

    copy_weights: copy the q/k/v/o weights and biases (a bias the old layer lacks starts at zero;
    with separate_branch_kv, k_proj/v_proj go into each branch's projections); the compression
    and gate parameters keep the layer's own initialisation. With copy_weights=False every
    parameter is freshly initialised, e.g. before loading a state dict saved from a replaced
    model (build the model from its config, replace_attention, then load_state_dict).
    The new modules take the old ones' device, dtype and train/eval mode.

    Decoding: generate() decodes with an NSAModelCache, which a hook set on the model makes
    (see the module docstring); model.config.use_cache becomes False, so that a plain forward
    makes none of transformers' caches, which the NSA layers refuse.

    Limits (each raises a ValueError when hit): padding only on the left of prompts and only
    with an NSAModelCache (without a cache, attention masks that mask out tokens are refused:
    pack sequences with restarting position_ids instead); no other cache than NSAModelCache.
    Non-default rotary scaling (e.g. Llama 3's rope_type="llama3") is not reproduced (a warning
    says so), nor attention dropout, nor extra parameters of the old attention such as Qwen3's
    q_norm/k_norm (a warning lists them).

    Returns the model, changed in place.
    """
    _require_transformers()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: expected a torch.nn.Module (a transformers model), got "
                        f"{type(model).__name__}")
    if nsa_kwargs is not None and not isinstance(nsa_kwargs, Mapping):
        raise TypeError(f"{_WHERE}: nsa_kwargs must be a dict of NativeSparseAttention "
                        f"arguments, got {type(nsa_kwargs).__name__}")
    olds = _find_attentions(model)
    cfg = _nsa_config(model, nsa_kwargs, olds)
    _check_shapes(cfg, olds, copy_weights)

    known = {f"{p}.{t}" for p in _PROJECTIONS for t in ("weight", "bias")}
    dropped = sorted({n for _, old, _ in olds for n, _ in old.named_parameters()} - known)
    if dropped and copy_weights:
        warnings.warn(f"{_WHERE}: the old attention has parameters NativeSparseAttention has no "
                      f"place for, dropped: {', '.join(dropped)}", stacklevel=2)
    for i, (parent, old, _) in enumerate(olds):
        ref = old.q_proj.weight
        with torch.device(ref.device):  # build in place, not on the CPU and then moved
            nsa = NativeSparseAttention.from_config(cfg)
        nsa = nsa.to(dtype=ref.dtype)
        if copy_weights:
            with torch.no_grad():
                _copy_linear(nsa.q_proj, old.q_proj)
                _copy_linear(nsa.o_proj, old.o_proj)
                for s in nsa.kv_suffixes():
                    _copy_linear(getattr(nsa, "k_proj" + s), old.k_proj)
                    _copy_linear(getattr(nsa, "v_proj" + s), old.v_proj)
        layer_idx = getattr(old, "layer_idx", None)
        new = NSASelfAttention(nsa, layer_idx=i if layer_idx is None else layer_idx)
        new.train(old.training)
        parent.self_attn = new

    # A plain forward (training, scoring) makes no cache: transformers' own would hold plain keys
    # and values, which the NSA layers refuse. generate() passes use_cache itself and, through
    # the hook below, gets an NSAModelCache.
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation,
                                                               model)
    return model


def __getattr__(name):
    """NSAModelCache and NSALayerCache live in hf_cache.py, which imports transformers: loaded on
    first use."""
    if name in ("NSAModelCache", "NSALayerCache"):
        _require_transformers()
        from . import hf_cache
        return getattr(hf_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
