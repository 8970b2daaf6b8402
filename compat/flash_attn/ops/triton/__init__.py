"""FA2's flash_attn.ops.triton (served by PyTorch code here)."""
