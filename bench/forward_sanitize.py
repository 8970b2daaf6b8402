"""Run under compute-sanitizer (racecheck, memcheck), with FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 for the mma.sync
kernels: small forwards through the C API at d = 32-256, causal and not, sq = sk and sq != sk, each compared with
a float32 reference (prints the max error).

    FLASH_ATTENTION_PLUS_PORTABLE_KERNELS=1 compute-sanitizer --tool racecheck python bench/forward_sanitize.py build/libflash_attn_plus.so
"""
import ctypes
import sys

import torch

import fap_ctypes as fc

lib = fc.load(sys.argv[1])
for d in (32, 64, 96, 128, 256):
    for causal in (False, True):
        for sq, sk in ((300, 300), (200, 453)):
            torch.manual_seed(0)
            q = torch.randn(2, sq, 2, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(2, sk, 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            out = torch.full_like(q, float("nan")); lse = torch.empty(2, 2, sq, device="cuda")
            o = lib.fap_default_options(); o.causal = int(causal)
            fwd = fc.FwdArgs(q=fc.tensor(q), k=fc.tensor(k), v=fc.tensor(v), out=fc.tensor(out), softmax_lse=fc.tensor(lse))
            fc.check(lib, lib.fap_mha_fwd(ctypes.byref(fwd), ctypes.byref(o), torch.cuda.current_stream().cuda_stream, None, 0))
            torch.cuda.synchronize()
            s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / d ** 0.5
            if causal:
                i = torch.arange(sq, device="cuda")[:, None]; j = torch.arange(sk, device="cuda")[None]
                s = s.masked_fill(j > i + sk - sq, float("-inf"))
            ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.float())
            print("d", d, "causal", causal, sq, sk, "max err", float((out.float() - ref).abs().max()), flush=True)
