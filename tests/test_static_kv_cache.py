"""nsa_torch.modules.StaticKVCache, FullAttention's decoding state (the dense baseline of
decoding): a prefill then steps of one or several tokens give the rows of one full causal
forward, with and without enable_gqa, on CPU in float64; bad input raises."""
import pytest
import torch

from nsa_torch.modules import FullAttention, StaticKVCache
from helpers import assert_close

F64 = torch.float64


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("HQ,H", [(4, 2), (3, 3)])
def test_prefill_then_steps_equal_the_full_forward(gqa, HQ, H):
    torch.manual_seed(0)
    layer = FullAttention(24, HQ, H, 8, 6, rope_theta=100.0, gqa=gqa).to(F64)
    x = torch.randn(3, 23, 24, dtype=F64)
    cache = StaticKVCache.for_layer(layer, 3, 30)
    assert cache.k.shape == (3, 30, H, 8) and cache.v.shape == (3, 30, H, 6)
    assert cache.k.dtype == F64
    # a prefill, steps of one token, a chunk of four (a causal mask inside it), one token again
    cuts = [0, 9, 10, 11, 15, 16, 23]
    outs = [layer(x[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
    assert cache.length == 23 and not any(o.requires_grad for o in outs)  # (inference)
    assert_close(torch.cat(outs, 1), layer(x), 1e-12, "cached rows")


def test_positions_follow_the_cache():
    """Without position_ids a step's tokens sit after the cached ones; explicit ones win."""
    torch.manual_seed(1)
    layer = FullAttention(16, 2, 1, 8).to(F64)
    x = torch.randn(1, 6, 16, dtype=F64)
    pos = torch.arange(6)[None] * 5
    cache = StaticKVCache.for_layer(layer, 1, 6)
    layer(x[:, :5], position_ids=pos[:, :5], cache=cache)
    assert_close(layer(x[:, 5:], position_ids=pos[:, 5:], cache=cache),
                 layer(x, position_ids=pos)[:, 5:], 1e-12, "explicit positions")
    cache = StaticKVCache.for_layer(layer, 1, 6)
    layer(x[:, :5], cache=cache)
    assert not torch.allclose(layer(x[:, 5:], cache=cache), layer(x, position_ids=pos)[:, 5:])


def test_bad_input():
    layer = FullAttention(16, 2, 1, 8)
    cache = StaticKVCache.for_layer(layer, 2, 8)
    layer(torch.randn(2, 6, 16), cache=cache)
    with pytest.raises(ValueError, match=r"StaticKVCache: 6 cached \+ 3 new tokens exceed the capacity"):
        layer(torch.randn(2, 3, 16), cache=cache)
    assert cache.length == 6  # (nothing written)
    with pytest.raises(ValueError, match=r"StaticKVCache: the layer's keys \[3, 1, 1, 8\] .* not fit"):
        layer(torch.randn(3, 1, 16), cache=cache)
    with pytest.raises(ValueError, match="StaticKVCache: the layer's keys are torch.float32 on "
                                         "cpu, the cache torch.float64"):
        layer(torch.randn(2, 1, 16), cache=StaticKVCache.for_layer(layer, 2, 8, dtype=F64))
    with pytest.raises(ValueError, match="FullAttention: a cache holds a batch"):
        layer(torch.randn(1, 4, 16), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
              cache=StaticKVCache.for_layer(layer, 1, 8))
