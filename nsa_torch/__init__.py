"""nsa-torch: DeepSeek's Native Sparse Attention as fast, trainable PyTorch ops.

    import nsa_torch
    o = nsa_torch.nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_swa)

The ops live in the compiled extension ``nsa_torch._C`` (registered as ``torch.ops.nsa.*``);
``nsa_torch.reference`` is the plain-PyTorch definition they are tested against and works
without the extension.
"""
import warnings

from . import reference

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.nsa.*)
except ImportError as _err:  # reference-only use still works; every op raises with this reason
    _C = None
    _C_ERROR = _err
    warnings.warn(
        "nsa_torch: the compiled ops (nsa_torch._C) could not be loaded, so only "
        "nsa_torch.reference works. Build them with `pip install --no-build-isolation -e .` "
        f"against the torch you run. Reason: {_err}",
        stacklevel=2,
    )
else:
    _C_ERROR = None
    from . import ops  # noqa: F401  (fake kernels and autograd of the ops)

from .functional import (  # noqa: E402
    compressed_attention,
    decode_attention,
    nsa_attention,
    select_blocks,
    selected_attention,
    sliding_window_attention,
)
from .cache import NSACache  # noqa: E402
from .modules import BlockCompression, NativeSparseAttention, NSAConfig  # noqa: E402

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "nsa_attention",
    "decode_attention",
    "reference",
    "NativeSparseAttention",
    "NSAConfig",
    "NSACache",
    "BlockCompression",
]
