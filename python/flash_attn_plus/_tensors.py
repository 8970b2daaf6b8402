"""torch tensors as the C API sees them.

The extension reads a tensor's pointer, dtype, device, shape and strides through its Python attributes; only
that description crosses into C, the data stays where it is. Dtypes the library does not know get code -1 and
devices other than the CPU and CUDA device type -1, which the core's validation rejects naming the argument.
"""
import torch

from ._library import _C

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int32: 3}
_C.register_dtypes(_DTYPE_CODES)


def dtype_code(dtype):
    """fap_dtype's code of a torch dtype (-1: one the library does not know)."""
    return _DTYPE_CODES.get(dtype, -1)


def stream_of(tensor):
    """The CUstream to queue work on: torch's current stream of the tensor's device (0 on the CPU)."""
    if not tensor.is_cuda:
        return 0
    return _current_raw_stream(tensor.get_device())


def _current_raw_stream(index):
    # torch's own accessor of the current stream's handle (what Triton's launcher uses): a fraction of the
    # cost of torch.cuda.current_stream(), which builds a Stream object.
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter(index) if getter else torch.cuda.current_stream(index).cuda_stream


def allocate_workspace(nbytes, like):
    """The extension's callback for a call's workspace: a byte tensor on like's device from torch's caching
    allocator."""
    return torch.empty(nbytes, dtype=torch.uint8, device=like.device)
