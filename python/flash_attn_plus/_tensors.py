"""torch tensors as the C API sees them: (data_ptr, dtype code, device type, device index, shape, strides).

Only the description crosses into C; the data stays where it is. Dtypes and devices the library does not
know get code -1, which the core's validation rejects with a message naming the argument.
"""
import torch

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int32: 3}
_DEVICE_CODES = {"cpu": 0, "cuda": 1}


def dtype_code(dtype):
    """fap_dtype's code of a torch dtype (-1: one the library does not know)."""
    return _DTYPE_CODES.get(dtype, -1)


def spec(tensor):
    if tensor is None:
        return None
    device = tensor.device
    return (tensor.data_ptr(), _DTYPE_CODES.get(tensor.dtype, -1), _DEVICE_CODES.get(device.type, -1),
            device.index or 0, tuple(tensor.shape), tuple(tensor.stride()))


def stream_of(tensor):
    """The CUstream to queue work on: torch's current stream of the tensor's device (0 on the CPU)."""
    device = tensor.device
    if device.type != "cuda":
        return 0
    return _current_raw_stream(device.index if device.index is not None else torch.cuda.current_device())


def _current_raw_stream(index):
    # torch's own accessor of the current stream's handle (what Triton's launcher uses): a fraction of the
    # cost of torch.cuda.current_stream(), which builds a Stream object.
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter(index) if getter else torch.cuda.current_stream(index).cuda_stream
