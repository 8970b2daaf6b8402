"""FA2's flash_attn.layers.rotary (the functional entry point)."""
from flash_attn_plus.rotary import apply_rotary_emb  # noqa: F401
