"""Backend selection from Python: set_backend, the context manager, info(), the environment variables
(including FLASH_ATTENTION_USE_FLAGGEMS) and device mismatches."""
import os
import platform
import subprocess
import sys

import pytest
import torch

import flash_attn_plus as fap


def _qkv(device="cpu"):
    return [torch.randn(1, 8, 2, 16, dtype=torch.float16, device=device) for _ in range(3)]


def test_context_manager_switches_and_restores():
    assert fap.get_backend() == "auto"
    q, k, v = _qkv()
    with fap.backend("cpu"):
        assert fap.get_backend() == "cpu"
        out = fap.flash_attn_func(q, k, v)
    assert fap.get_backend() == "auto"
    assert torch.equal(out, fap.flash_attn_func(q, k, v))


def test_selection_survives_an_exception_in_the_block():
    with pytest.raises(KeyError):
        with fap.backend("cpu"):
            raise KeyError("x")
    assert fap.get_backend() == "auto"


def test_blocks_of_two_threads_that_interleave_restore_the_selection():
    """Thread A opens a block, thread B opens one, A closes, B closes: the selection ends where it began (it
    ended at 'cpu' when each block restored what it had seen on entry)."""
    import threading
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def thread_a():
        with fap.backend("cpu"):
            steps[0].set()
            steps[1].wait(5)
        seen["after a"] = fap.get_backend()
        steps[2].set()

    def thread_b():
        steps[0].wait(5)
        with fap.backend("cpu"):
            steps[1].set()
            steps[2].wait(5)
            seen["inside b"] = fap.get_backend()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after a": "cpu", "inside b": "cpu"}  # B's block still open when A's ended
    assert fap.get_backend() == "auto"


def test_set_backend_inside_a_block_takes_effect_when_it_ends():
    with fap.backend("cpu"):
        fap.set_backend("auto")
        assert fap.get_backend() == "cpu"
        with pytest.raises(fap.InvalidArgumentError, match="unknown name"):
            fap.set_backend("tpu")
        assert fap.get_backend() == "cpu"
    assert fap.get_backend() == "auto"


def test_unknown_and_unusable_backends_are_refused_with_the_reason():
    with pytest.raises(fap.InvalidArgumentError, match="unknown name 'tpu'"):
        fap.set_backend("tpu")
    with pytest.raises(fap.InvalidArgumentError, match="name"):
        fap.set_backend(3)
    listed = {name: (usable, reason) for name, usable, reason, _ in fap.available_backends()}
    assert set(listed) == {"cuda", "cpu", "flaggems"}
    assert listed["cpu"][0]
    if not listed["flaggems"][0]:
        with pytest.raises(fap.BackendUnavailableError, match=listed["flaggems"][1].split(" (")[0]):
            fap.set_backend("flaggems")
    if not listed["cuda"][0]:  # refused when selected, with the reason, and the selection stays
        with pytest.raises(fap.BackendUnavailableError, match="backend 'cuda' is unusable"):
            fap.set_backend("cuda")
        assert fap.get_backend() == "auto"


def test_cpu_tensors_on_the_cuda_backend_are_refused(device):
    if not any(name == "cuda" and usable for name, usable, _, _ in fap.available_backends()):
        pytest.skip("no usable CUDA backend here")
    with fap.backend("cuda"), pytest.raises(fap.InvalidArgumentError, match="cannot run on cpu tensors"):
        fap.flash_attn_func(*_qkv("cpu"))
    if device.type == "cuda":
        q, k, v = _qkv("cuda")
        with pytest.raises(fap.InvalidArgumentError, match="k: expected a tensor on"):
            fap.flash_attn_func(q, k.cpu(), v)
        with fap.backend("cpu"), pytest.raises(fap.InvalidArgumentError, match="cannot run on cuda tensors"):
            fap.flash_attn_func(q, k, v)


def test_info_lists_every_backend(capsys):
    text = fap.info()
    assert capsys.readouterr().out.strip() == text.strip()
    for name in ("cuda", "cpu", "flaggems", "kernel cache:", "selected backend: auto"):
        assert name in text


def _run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_environment_variables_set_the_initial_choice():
    assert _run_python("import flash_attn_plus as f; print(f.get_backend())",
                       FLASH_ATTENTION_PLUS_BACKEND="cpu") == "cpu"
    # CPU tensors: refused either way, as unusable (no flag_gems, no GPU) or as not FlagGems' device.
    code = ("import torch, flash_attn_plus as f\n"
            "print(f.get_backend())\n"
            "try:\n"
            "    f.flash_attn_func(*[torch.randn(1, 4, 1, 8, dtype=torch.float16)] * 3)\n"
            "except (f.BackendUnavailableError, f.UnsupportedError) as e:\n"
            "    print('refused:', e)\n")
    for env in ({"FLASH_ATTENTION_USE_FLAGGEMS": "1"}, {"FLASH_ATTENTION_PLUS_BACKEND": "flaggems"}):
        output = _run_python(code, **env)
        assert output.startswith(("flaggems\nrefused: backend 'flaggems' is unusable: ",
                                  "flaggems\nrefused: q: backend 'flaggems' runs on CUDA tensors")), output


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86-64 instruction set")
def test_cpu_isa_avx2_holds_the_cpu_backend_to_avx2():
    """FLASH_ATTENTION_PLUS_CPU_ISA=avx2: Highway dispatches no AVX-512 target (AVX2 where the CPU has it) and
    libxsmm, where linked, generates Haswell code; unset: the CPU's best, which on an AVX-512 machine differs."""
    def cpu_line(value):
        lines = [line.strip() for line in _run_python("import flash_attn_plus as f; f.info()",
                                                       FLASH_ATTENTION_PLUS_CPU_ISA=value).splitlines()
                 if "instruction sets:" in line]
        assert len(lines) == 1, lines
        return lines[0]

    held, native = cpu_line("avx2"), cpu_line("")
    assert "Highway AVX3" not in held, held
    if "libxsmm" in held:
        assert held.endswith("libxsmm hsw"), held
    if "Highway AVX3" in native:
        assert "Highway AVX2" in held and held != native, (held, native)
