"""Loads the compiled extension (flash_attn_plus._C), after pointing it at the nvidia-cuda-nvrtc wheel.

The extension links neither torch nor CUDA. The CUDA backend finds NVRTC at run time; when the
`nvidia-cuda-nvrtc` wheel (`pip install flash-attn-plus[cuda]`) is in this Python environment, its
folder is offered first after an explicit FLASH_ATTENTION_PLUS_NVRTC (docs/jit-cache.md lists the order).
"""
import glob
import os


def _nvrtc_wheel_dir():
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for lib in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
            folder = os.path.join(root, lib)
            if glob.glob(os.path.join(folder, "libnvrtc.so*")):
                return folder
    return None


if "FLASH_ATTENTION_PLUS_PYTHON_NVRTC_DIR" not in os.environ:
    _folder = _nvrtc_wheel_dir()
    if _folder:
        os.environ["FLASH_ATTENTION_PLUS_PYTHON_NVRTC_DIR"] = _folder

from . import _C  # noqa: E402  (after the environment is set: the library reads it on first use)

__all__ = ["_C"]
