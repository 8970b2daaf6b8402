"""What a decode call spends: run under ncu for the kernels (one case, no graph), or alone for a cProfile of the
host side of 300 eager calls.

    ncu -k regex:attention_decode --launch-skip 4 --launch-count 2 python bench/decode_profile.py --batch 1 --cache 8192
    python bench/decode_profile.py --host
"""
import argparse
import cProfile
import pstats

import torch

import flash_attn_plus as fap


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=int, default=8192)
    parser.add_argument("--host", action="store_true", help="cProfile of the host side instead")
    parser.add_argument("--cudnn", action="store_true", help="run torch SDPA's cuDNN backend instead of ours")
    parser.add_argument("--library", help="a libflash_attn_plus.so: also time its plan and run steps (ctypes)")
    args = parser.parse_args()
    q = torch.randn(args.batch, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(args.batch, args.cache, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    seqlens = torch.full((args.batch,), args.cache, dtype=torch.int32, device="cuda")
    call = lambda: fap.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    if args.cudnn:  # the baseline's kernel, for the same profile
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        def call():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    if args.host:
        profile = cProfile.Profile()
        profile.runcall(lambda: [call() for _ in range(300)])
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    if args.library:
        plan_times(args.library, q, k, v, seqlens)


def plan_times(path, q, k, v, seqlens, calls=500):
    """Host time of the C API's steps for this call (through ctypes, whose own cost is in each number)."""
    import ctypes

    import fap_ctypes as fc
    from host_overhead import host_us
    lib = fc.load(path)
    lib.fap_plan_fwd.argtypes = [ctypes.POINTER(fc.FwdArgs), ctypes.POINTER(fc.Options), ctypes.c_int32,
                                 ctypes.POINTER(ctypes.c_void_p)]
    lib.fap_plan_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.fap_plan_workspace_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.fap_plan_destroy.argtypes = [ctypes.c_void_p]
    out, lse = torch.empty_like(q), torch.empty(q.shape[0], 32, 1, device="cuda")
    options = lib.fap_default_options()
    args = fc.FwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), softmax_lse=fc.tensor(lse),
                      cache_seqlens=fc.tensor(seqlens), rotary_interleaved=1)
    plan, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = torch.cuda.current_stream().cuda_stream
    fc.check(lib, lib.fap_plan_fwd(ctypes.byref(args), ctypes.byref(options), 0, ctypes.byref(plan)))
    fc.check(lib, lib.fap_plan_workspace_size(plan, ctypes.byref(size)))
    workspace = torch.empty(max(size.value, 16), dtype=torch.uint8, device="cuda")
    planned = ctypes.c_void_p()

    def plan_and_destroy():
        lib.fap_plan_fwd(ctypes.byref(args), ctypes.byref(options), 0, ctypes.byref(planned))
        lib.fap_plan_destroy(planned)

    steps = {
        "plan+destroy": plan_and_destroy,
        "run": lambda: lib.fap_plan_run(plan, stream, workspace.data_ptr(), size.value),
        "ctypes floor (fap_api_version)": lambda: lib.fap_api_version(),
    }
    for name, step in steps.items():
        print(f"{name}: {host_us(step, calls):.1f} us", flush=True)


if __name__ == "__main__":
    main()
