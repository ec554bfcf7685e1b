"""Helpers that put nsa_torch.NativeSparseAttention into models of other libraries.

    from nsa_torch.integrations.hf import replace_attention   # Hugging Face transformers

Each helper lives in its own submodule and imports its library only when called, so importing
nsa_torch never needs those libraries.
"""
