"""NSAModelCache: the transformers Cache of a model converted by replace_attention.

    from nsa_torch.integrations.hf import NSAModelCache
    cache = NSAModelCache()                              # generate() makes one by itself
    out = model(ids, cache=cache, use_cache=True)        # past_key_values= in transformers 4.x
    out = model(next_ids, cache=cache, use_cache=True)   # the next tokens of every sequence

It holds one nsa_torch.NSACache per decoder layer, made by the layer's first call (the prefill)
with that call's batch size, device and the dtype the layer's attention runs in, and room for
`max_length` tokens per sequence (generate() gives its max_length; None: the first call's
tokens and 256 more). A call that would overflow it reallocates the layer's NSACache (twice the
size, or what the call needs) and copies it over, in Python before the layer runs; with
grow=False it raises instead, so that the buffers stay fixed (e.g. under CUDA graphs captured
over the layers, which would keep reading the old ones).

Works with the Cache API of transformers 4.56 (the first with per-layer cache objects) to 5.x
(tested with 4.57 and 5.25): transformers asks the cache only for lengths (get_seq_length,
get_mask_sizes); the NSA layers find their NSACache here themselves. Beam search (reorder_cache)
works; anything that removes tokens (crop: assisted generation) or copies sequences
(batch_repeat_interleave, batch_select_indices) raises.
"""
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import NSACache
from ..modules import _attention_dtype as modules_attention_dtype

_WHERE = "nsa_torch.integrations.hf.NSAModelCache"
# Room for this many generated tokens past the prompt when a growing cache is first made.
_FIRST_ROOM = 256


class NSALayerCache(CacheLayerMixin):
    """One decoder layer's part of an NSAModelCache: its NSACache (None until the layer's first
    call) and the count of token positions fed to it (transformers' sequence length)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False  # (transformers 5: early_initialization skips the layer)

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.nsa_cache = None
        self.seen = 0

    def __repr__(self):
        return f"NSALayerCache(layer {self.layer_idx}: {self.nsa_cache})"

    def _refuse(self, what):
        raise ValueError(f"{_WHERE}: layer {self.layer_idx}: {what} is not supported")

    # What transformers asks of a cache layer (both the 4.5x and the 5.x names).
    def lazy_initialization(self, *args, **kwargs):
        self.update()

    def update(self, *args, **kwargs):
        raise ValueError(
            f"{_WHERE}: layer {self.layer_idx} is not an NSA layer: it tried to store plain "
            "attention keys and values, which an NSAModelCache does not hold. Convert every "
            "attention layer with replace_attention, or use the model's own cache")

    def get_seq_length(self, *args):
        return self.seen

    def get_mask_sizes(self, query):
        """(kv_length, kv_offset) of the attention mask: query is the query length (transformers
        5) or cache_position (4.5x)."""
        q = query if isinstance(query, int) else query.shape[0]
        return self.seen + q, 0

    def get_max_length(self):
        return -1 if self.nsa_cache is None else self.nsa_cache.capacity

    get_max_cache_shape = get_max_length  # (transformers 4.5x)

    def reset(self):
        if self.nsa_cache is not None:
            self.nsa_cache.reset()
        self.seen = 0

    def reorder_cache(self, beam_idx):
        """Sequence b takes the state of sequence beam_idx[b] (beam search)."""
        if self.nsa_cache is not None:
            self.nsa_cache.reorder(beam_idx)

    def crop(self, length):
        """Only a crop that removes nothing: transformers 5 passes -n to remove n tokens (0:
        none), 4.5x the length to keep (or -n)."""
        keep = self.seen + length if length <= 0 else length
        if length != 0 and keep < self.seen:
            self._refuse(f"removing {self.seen - keep} tokens (crop, as assisted generation does)")

    def batch_repeat_interleave(self, repeats):
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._refuse("batch_select_indices")


class NSAModelCache(Cache):
    """A transformers Cache for a model converted by replace_attention (see the module
    docstring). max_length: the tokens (prompt and generated) each sequence is given room for
    at first (None: the first call's tokens and 256 more); grow: whether a call past that room
    reallocates (else it raises). generate() makes one by itself, sized to its max_length."""

    def __init__(self, max_length=None, grow=True):
        if max_length is not None and (not isinstance(max_length, int)
                                       or isinstance(max_length, bool) or max_length <= 0):
            raise ValueError(f"{_WHERE}: max_length must be a positive int or None, got "
                             f"{max_length!r}")
        super().__init__(layers=[])
        self.max_length, self.grow = max_length, bool(grow)

    def __repr__(self):
        return (f"NSAModelCache(max_length={self.max_length}, grow={self.grow}, "
                f"layers={self.layers})")

    def layer(self, layer_idx):
        """The NSALayerCache of decoder layer layer_idx (made empty on first use)."""
        while len(self.layers) <= layer_idx:
            self.layers.append(NSALayerCache(len(self.layers)))
        return self.layers[layer_idx]

    def nsa_cache_for(self, where, layer_idx, nsa, x, batch_size, new_tokens):
        """The NSACache of layer layer_idx (nsa, a NativeSparseAttention, called on hidden states
        x) for batch_size sequences that each get new_tokens more tokens: made on the first
        call, grown when needed and allowed, checked otherwise."""
        entry = self.layer(layer_idx)
        c = entry.nsa_cache
        made = (batch_size, x.device, _attention_dtype(nsa, x))
        # (an empty cache, e.g. after reset(), takes any batch)
        if c is None or (entry.seen == 0 and (c.batch_size, c.device, c.dtype) != made):
            capacity = self.max_length or new_tokens + _FIRST_ROOM
            if self.grow:
                capacity = max(capacity, new_tokens)
            self._check_room(where, 0, new_tokens, capacity)
            entry.nsa_cache = NSACache(nsa, batch_size, capacity, device=made[1], dtype=made[2])
            return entry.nsa_cache
        if batch_size != c.batch_size:
            raise ValueError(f"{where}: the NSAModelCache holds {c.batch_size} sequences, got a "
                             f"batch of {batch_size} (one cache serves one batch; reset() it "
                             "or make a new one for another)")
        longest = max(c.lengths)
        if longest + new_tokens > c.capacity:
            if not self.grow:
                self._check_room(where, longest, new_tokens, c.capacity)
            entry.nsa_cache = c.resized(nsa, max(longest + new_tokens, 2 * c.capacity))
        return entry.nsa_cache

    def _check_room(self, where, held, new_tokens, capacity):
        if held + new_tokens > capacity:
            raise ValueError(
                f"{where}: the NSAModelCache holds {held} tokens per sequence and gets "
                f"{new_tokens} more, but it has room for {capacity} (NSAModelCache(max_length="
                f"{self.max_length}, grow={self.grow}))")


def _attention_dtype(nsa, x):
    """The dtype nsa's attention runs in on hidden states x: its projections' (or autocast's),
    except float32 on CUDA: bfloat16 (as NativeSparseAttention does)."""
    dtype = nsa.q_proj.weight.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return modules_attention_dtype(dtype, x.device)
