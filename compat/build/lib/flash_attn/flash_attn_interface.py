"""FA2's flash_attn.flash_attn_interface: the public functions and the helpers libraries import."""
from flash_attn_plus.interface import (  # noqa: F401
    USE_TRITON_ROCM,
    _flash_attn_backward,
    _flash_attn_forward,
    _flash_attn_varlen_backward,
    _flash_attn_varlen_forward,
    _get_block_size_n,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    maybe_contiguous,
)
from flash_attn_plus.kvcache import flash_attn_with_kvcache  # noqa: F401
from flash_attn_plus.ops import round_multiple  # noqa: F401
