"""FA2's flash_attn.ops.triton.rotary.apply_rotary (same arguments; computed with PyTorch operations)."""
from flash_attn_plus.rotary import apply_rotary  # noqa: F401
