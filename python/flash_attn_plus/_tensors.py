"""torch tensors as the C API sees them: (data_ptr, dtype code, device type, device index, shape, strides).

Only the description crosses into C; the data stays where it is. Dtypes and devices the library does not
know get code -1, which the core's validation rejects with a message naming the argument.
"""
import torch

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.int32: 3}
_DEVICE_CODES = {"cpu": 0, "cuda": 1}


def spec(tensor):
    if tensor is None:
        return None
    device = tensor.device
    return (tensor.data_ptr(), _DTYPE_CODES.get(tensor.dtype, -1), _DEVICE_CODES.get(device.type, -1),
            device.index or 0, tuple(tensor.shape), tuple(tensor.stride()))


def stream_of(tensor):
    """The CUstream to queue work on: torch's current stream of the tensor's device (0 on the CPU)."""
    if tensor.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(tensor.device).cuda_stream


def workspace_allocator(device):
    """A callback for the extension: allocates through torch's caching allocator and keeps the buffers
    alive for as long as the returned list lives (the length of the call)."""
    buffers = []

    def allocate(nbytes):
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        buffers.append(buffer)
        return buffer.data_ptr()

    return allocate, buffers
