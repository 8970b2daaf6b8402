"""Backend selection: which implementation runs the attention.

Backends: `cuda` (our run-time compiled kernels), `cpu` (the same semantics on the host) and `flaggems`
(FlagGems' Triton kernels, served from Python). `auto` (the default) runs each call on the best usable
backend for its tensors' device. The initial choice comes from FLASH_ATTENTION_PLUS_BACKEND, or from the
original FlashAttention-Plus switch FLASH_ATTENTION_USE_FLAGGEMS=1; set_backend() and the backend()
context manager change it at run time. The selection is process-wide (the C library's): a `with backend(...)`
block overrides it for every thread while it is open, and when blocks of several threads interleave, the
selection in force is the most recently opened block still open, else the set_backend() choice.
"""
import contextlib
import os
import threading

from . import _errors, flaggems
from ._library import _C

_PYTHON_BACKENDS = ("flaggems",)
_lock = threading.Lock()
_python_choice = None  # a backend served from Python, or None when the C library's choice applies
_chosen = None  # set_backend()'s choice, in force when no `with backend(...)` block is open (None: the initial one)
_open_blocks = []  # (token, name) of the open `with backend(...)` blocks, oldest first


def _select(name):
    """Puts `name` in force (under _lock), refusing an unknown or unusable backend with the reason."""
    global _python_choice
    if not isinstance(name, str):
        raise _errors.InvalidArgumentError(f"name: expected a backend name (str), got {type(name).__name__}")
    name = name.strip().lower()
    if name in _PYTHON_BACKENDS:
        reason = flaggems.unusable_reason()
        if reason:
            raise _errors.BackendUnavailableError(f"backend '{name}' is unusable: {reason}")
        _C.set_backend("auto")  # what the Python backend leaves to the library (backwards) runs on `auto`
        _python_choice = name
        return name
    # A library backend that cannot run here is refused now, with its reason, not at the first call.
    for listed, usable, reason, _ in _C.backends():
        if listed == name and not usable:
            raise _errors.BackendUnavailableError(f"backend '{name}' is unusable: {reason}")
    _errors.check(_C.set_backend(name))
    _python_choice = None
    return name


def set_backend(name):
    """Selects 'auto', 'cuda', 'cpu' or 'flaggems' for every following call in this process (inside an open
    `with backend(...)` block it takes effect when the last open block ends)."""
    global _chosen
    with _lock:
        _chosen = _select(name)  # checked and applied now
        if _open_blocks:  # the innermost open block's choice stays in force
            _select(_open_blocks[-1][1])


def get_backend():
    """The current selection ('auto' unless changed)."""
    return _python_choice or _C.get_backend()


@contextlib.contextmanager
def backend(name):
    """`with flash_attn_plus.backend("cpu"):` runs the block on that backend, then restores the selection (see the
    module's docstring for blocks of several threads)."""
    global _chosen
    token = object()
    with _lock:
        if _chosen is None:
            _chosen = get_backend()
        _open_blocks.append((token, _select(name)))
    try:
        yield
    finally:
        with _lock:
            _open_blocks.remove(next(block for block in _open_blocks if block[0] is token))
            _select(_open_blocks[-1][1] if _open_blocks else _chosen)


def available_backends():
    """[(name, usable, reason, details)] for every backend, in the order `auto` tries them."""
    listed = [tuple(entry) for entry in _C.backends()]
    for name in _PYTHON_BACKENDS:
        reason = flaggems.unusable_reason()
        listed.append((name, not reason, reason, "" if reason else flaggems.versions()))
    return listed


def info():
    """Prints (and returns) every backend, whether it is usable and why not, library versions and the
    kernel cache directory."""
    lines = [f"flash_attn_plus {_C.version()} (C API {_C.api_version()}), selected backend: {get_backend()}"]
    for name, usable, reason, details in available_backends():
        lines.append(f"  {name:9s} {'usable' if usable else 'unusable: ' + reason}")
        if details:
            lines.append(f"            {details}")
    text = "\n".join(lines)
    print(text)
    return text


def _apply_environment():
    requested = os.environ.get("FLASH_ATTENTION_PLUS_BACKEND", "").strip().lower()
    if not requested and os.environ.get("FLASH_ATTENTION_USE_FLAGGEMS", "").strip().lower() in ("1", "true", "yes"):
        requested = "flaggems"
    if requested in _PYTHON_BACKENDS:
        # The C library must not see a name it does not know; the Python layer holds this choice.
        global _python_choice
        _C.set_backend("auto")
        _python_choice = requested


def python_backend():
    """The selected backend served from Python ('flaggems'), or None when the library's selection applies.
    Raises the reason when one is selected (through the environment) but cannot run."""
    if _python_choice is not None:
        reason = flaggems.unusable_reason()
        if reason:
            raise _errors.BackendUnavailableError(f"backend '{_python_choice}' is unusable: {reason}")
    return _python_choice


_apply_environment()
