"""Python exceptions for the C API's status codes.

Every class derives from RuntimeError, which is what FlashAttention-2 raises for bad input, so code written
against FA2 keeps catching it; the more precise bases (ValueError, NotImplementedError, MemoryError) let new
code be exact.
"""
from ._library import _C


class FlashAttentionError(RuntimeError):
    """Base class of every error the library reports."""


class InvalidArgumentError(FlashAttentionError, ValueError):
    """An argument breaks the contract; the message names it and says what was expected."""


class UnsupportedError(FlashAttentionError, NotImplementedError):
    """A valid request that the selected backend cannot serve (yet); the message says which part."""


class BackendUnavailableError(FlashAttentionError):
    """The requested backend cannot run on this machine; the message says what is missing."""


class DeviceError(FlashAttentionError):
    """The CUDA driver or the run-time compiler failed; the message carries its text or the compile log."""


class OutOfMemoryError(FlashAttentionError, MemoryError):
    """A buffer could not be allocated."""


_BY_STATUS = {
    _C.ERROR_INVALID_ARGUMENT: InvalidArgumentError,
    _C.ERROR_UNSUPPORTED: UnsupportedError,
    _C.ERROR_BACKEND_UNAVAILABLE: BackendUnavailableError,
    _C.ERROR_DEVICE: DeviceError,
    _C.ERROR_OUT_OF_MEMORY: OutOfMemoryError,
}


def check(status):
    """Raises the exception for a failed C API call (the message is this thread's fap_last_error())."""
    if status != _C.SUCCESS:
        raise _BY_STATUS.get(status, FlashAttentionError)(_C.last_error())
