"""The Python suite runs on the CPU by default; `--device cuda` (or FAP_TEST_DEVICE=cuda) runs the same
cases on CUDA tensors (bench/gpu_python.sh does this on a machine with a GPU)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("FAP_TEST_DEVICE", "cpu"), choices=("cpu", "cuda"),
                     help="device of the test tensors")


@pytest.fixture(scope="session")
def device(request):
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: torch sees no CUDA device")
    return torch.device(name)


@pytest.fixture(params=["auto", "flaggems"])
def api_backend(request, device):
    """Runs a test on each backend of the selection: `auto` (the library) and `flaggems` where it is usable
    (CUDA tensors, flag_gems installed and working); skipped with the reason elsewhere."""
    if request.param == "flaggems":
        import flash_attn_plus as fap
        if device.type != "cuda":
            pytest.skip("backend 'flaggems' runs on CUDA tensors (--device cuda)")
        reason = fap.flaggems.unusable_reason()
        if reason:
            pytest.skip(f"backend 'flaggems' is unusable: {reason}")
    import flash_attn_plus as fap
    with fap.backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
