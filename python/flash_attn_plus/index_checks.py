"""Index checks: whether calls read device-resident index arrays on the host to check them.

By default cu_seqlens_q and cu_seqlens_k on the GPU are not read by the host, which would synchronise every
call: the kernels clamp every index they read, so corrupt offsets (decreasing, past the end of the tensors)
give wrong results but never an access out of bounds. With the checks on, every varlen call copies them to the
host after the GPU's pending work and the library checks them as it checks host-resident ones, each error
naming the argument (`fap_set_index_checks` in the C API). The environment variable
FLASH_ATTENTION_PLUS_CHECK_INDICES=1 turns them on from the start.
"""
import contextlib

from . import _errors
from ._library import _C


def set_index_checks(enabled):
    """Turns the index checks on (True) or off (False) for every later call of this process."""
    if not isinstance(enabled, bool):
        raise _errors.InvalidArgumentError(f"enabled: expected a bool, got {enabled!r}")
    _errors.check(_C.set_index_checks(int(enabled)))


def index_checks():
    """Whether the index checks are on."""
    return bool(_C.index_checks())


@contextlib.contextmanager
def checked_indices(enabled=True):
    """The index checks on (or off) inside the block, restored afterwards (process-wide: other threads' calls in
    the meantime see the same setting)."""
    before = index_checks()
    set_index_checks(enabled)
    try:
        yield
    finally:
        set_index_checks(before)
