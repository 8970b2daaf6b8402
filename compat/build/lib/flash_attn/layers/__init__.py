"""FA2's flash_attn.layers."""
