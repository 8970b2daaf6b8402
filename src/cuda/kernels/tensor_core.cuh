// Tensor-core building blocks shared by the attention kernels (sm_80+, and Turing's sm_75 for fp16): fp16/bf16
// storage and rounding, cp.async, ldmatrix and mma.sync.m16n8k16 wrappers, and the shared-memory tile loader. It
// includes no toolkit header (NVRTC compiles the kernels from the library's embedded files alone).
//
// On sm_75 (no cp.async, no bf16 MMA, no m16n8k16) the same kernels compile with synchronous 16-byte copies in
// place of cp.async (the waits become no-ops: a __syncthreads after the copies publishes them) and each
// m16n8k16 as two m16n8k8; bf16 is refused at compile time (the host never asks for it there).
//
// Uses FAP_HEAD_DIM (head dim rounded up to a multiple of 16), FAP_WARPS and FAP_BF16.
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FAP_TURING 1
#if FAP_BF16
#error "bfloat16 tensor-core kernels need sm_80 or newer"
#endif
#else
#define FAP_TURING 0
#endif

#define FAP_STRIDE (FAP_HEAD_DIM + 8)  // shared-memory row stride in halves: +16 bytes avoids bank conflicts
#define FAP_INFINITY __int_as_float(0x7f800000)  // no math.h under NVRTC

namespace fap {

typedef unsigned short storage_t;  // the bits of one fp16 or bf16 element

#if FAP_BF16
__device__ __forceinline__ storage_t from_float(float x) {
  unsigned int bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (storage_t)((bits >> 16) | 0x40u);
  return (storage_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  unsigned int result;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(result) : "f"(hi), "f"(lo));
  return result;
}
__device__ __forceinline__ float to_float(storage_t x) { return __uint_as_float((unsigned int)x << 16); }
#define FAP_MMA_TYPES "bf16.bf16"
#else
__device__ __forceinline__ storage_t from_float(float x) {
  storage_t result;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(result) : "f"(x));
  return result;
}
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
#if FAP_TURING  // no paired conversion before sm_80
  return (unsigned int)from_float(lo) | (unsigned int)from_float(hi) << 16;
#else
  unsigned int result;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(result) : "f"(hi), "f"(lo));
  return result;
#endif
}
__device__ __forceinline__ float to_float(storage_t x) {
  float result;
  asm("cvt.f32.f16 %0, %1;" : "=f"(result) : "h"(x));
  return result;
}
#define FAP_MMA_TYPES "f16.f16"
#endif

// exp2 on the special function unit, flushing results below 2^-126 to zero (the softmax exponentials are of
// differences <= 0: nothing else is lost).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Elements col and col + 1 (those below head_dim) of an output row, from fp32. PAIRED (the row 4-byte aligned,
// head_dim even: pairs_aligned) in one 4-byte store, half the store instructions of two 2-byte ones (+12-27 % for
// the Hopper forward at 1k tokens on an H200, where the epilogue is a large part of each work item).
__device__ __forceinline__ bool pairs_aligned(const storage_t* row, int head_dim) {
  return head_dim % 2 == 0 && reinterpret_cast<unsigned long long>(row) % 4 == 0;
}
template <bool PAIRED>
__device__ __forceinline__ void store_pair(storage_t* row, int col, float lo, float hi, int head_dim) {
  if (PAIRED) {
    if (col < head_dim) *reinterpret_cast<unsigned int*>(row + col) = pack2(lo, hi);
  } else {
    if (col < head_dim) row[col] = from_float(lo);
    if (col + 1 < head_dim) row[col + 1] = from_float(hi);
  }
}

__device__ __forceinline__ unsigned int shared_address(const void* pointer) {
  return (unsigned int)__cvta_generic_to_shared(pointer);
}

#if !FAP_TURING
__device__ __forceinline__ void cp_async_16_to(unsigned int shared, const void* global) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(global));
}
__device__ __forceinline__ void cp_async_16(void* shared, const void* global) {
  cp_async_16_to(shared_address(shared), global);
}
// 16 bytes when `copy`, else 16 zero bytes (nothing is read).
__device__ __forceinline__ void cp_async_16_or_zero(void* shared, const void* global, bool copy) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(copy ? 16 : 0));
}
// cp_async_16_or_zero for streams read once from DRAM: the L2 fetches the whole 128-byte line around the address
// (+2-3 % decode bandwidth on the H200 over plain copies; 256-byte prefetches measured no better:
// bench/RESULTS.md).
__device__ __forceinline__ void cp_async_16_or_zero_streaming(void* shared, const void* global, bool copy) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(copy ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
// Waits until at most `PENDING` of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }
#else
__device__ __forceinline__ void cp_async_16_or_zero(void* shared, const void* global, bool copy) {
  *static_cast<uint4*>(shared) = copy ? *static_cast<const uint4*>(global) : make_uint4(0, 0, 0, 0);
}
__device__ __forceinline__ void cp_async_16(void* shared, const void* global) { cp_async_16_or_zero(shared, global, true); }
__device__ __forceinline__ void cp_async_16_or_zero_streaming(void* shared, const void* global, bool copy) {
  cp_async_16_or_zero(shared, global, copy);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() {}
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {}
#endif

// ldmatrix from a shared-state-space address (shared_address): loops that walk a tile add byte offsets to one
// address instead of recomputing a generic pointer per load.
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, unsigned int address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, unsigned int address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned int* r, const void* shared) {
  ldmatrix_x4(r, shared_address(shared));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned int* r, const void* shared) {
  ldmatrix_x4_trans(r, shared_address(shared));
}

// Programmatic dependent launch (sm_90+; no-ops before): a grid lets the next grid on its stream start early
// (launch_dependents), and that grid waits for its predecessor's completion and memory (wait_for_prerequisites)
// before reading what it wrote. The host opts the second launch in (cuLaunchKernelEx).
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}
__device__ __forceinline__ void wait_for_prerequisites() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Accumulator fragments (four fp32 values per thread per 16x8 or 64xN tile slice) set to zero.
template <int N>
__device__ __forceinline__ void zero_fragments(float (&fragments)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fragments[i][0] = fragments[i][1] = fragments[i][2] = fragments[i][3] = 0.0f;
}

// D (16x8 fp32) += A (16x16) * B (16x8).
__device__ __forceinline__ void mma_16816(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
#if !FAP_TURING
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." FAP_MMA_TYPES ".f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // sm_75: the k16 product as two k8 ones (A's registers 0-1 and B's first register hold k 0-7, the rest k 8-15).
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(b0));
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
}

// 16x16 fragments of a tile in shared memory, read by ldmatrix_x4 (.trans when TRANSPOSED): fragment `index` of
// k-step kk lies at this lane's address of fragment 0, k-step 0, plus index * INDEX_BYTES + kk * STEP_BYTES.
template <bool TRANSPOSED, int INDEX_BYTES, int STEP_BYTES>
struct SharedFragments {
  unsigned int lane_address;  // shared_address() of this lane's ldmatrix row in fragment 0, k-step 0
  __device__ __forceinline__ void operator()(unsigned int* fragment, int index, int kk) const {
    const unsigned int address = lane_address + index * INDEX_BYTES + kk * STEP_BYTES;
    if constexpr (TRANSPOSED)
      ldmatrix_x4_trans(fragment, address);
    else
      ldmatrix_x4(fragment, address);
  }
};

// acc (ROW_TILES tiles of 16 rows x 8 COLUMNS8 columns) += A (16 ROW_TILES x 16 K_STEPS) * B, both operands
// from shared memory: load_a(a, t, kk) loads row tile t's 16x16 A fragment of k-step kk, load_b(b, j, kk) the
// two k16 x n8 B fragments of columns 16 j .. 16 j + 15 (one ldmatrix_x4 each). Every B fragment feeds all row
// tiles, so a B read from shared memory serves ROW_TILES products.
template <int K_STEPS, int ROW_TILES, int COLUMNS8, typename LoadA, typename LoadB>
__device__ __forceinline__ void warp_mma_shared(float (&acc)[ROW_TILES][COLUMNS8][4], LoadA load_a, LoadB load_b) {
  static_assert(COLUMNS8 % 2 == 0, "B fragments come in pairs of 8 columns");
#pragma unroll
  for (int kk = 0; kk < K_STEPS; ++kk) {
    unsigned int a[ROW_TILES][4];
#pragma unroll
    for (int t = 0; t < ROW_TILES; ++t) load_a(a[t], t, kk);
#pragma unroll
    for (int j = 0; j < COLUMNS8 / 2; ++j) {
      unsigned int b[4];
      load_b(b, j, kk);
#pragma unroll
      for (int t = 0; t < ROW_TILES; ++t) {
        mma_16816(acc[t][2 * j], a[t], b[0], b[1]);
        mma_16816(acc[t][2 * j + 1], a[t], b[2], b[3]);
      }
    }
  }
}

// Columns 16 kk .. 16 kk + 15 of an fp32 accumulator (fragments 2 kk and 2 kk + 1) rounded to the A operand of
// a following product: an m16n8 accumulator's lanes hold what m16n8k16's A operand wants in the same lanes, so
// scores become the probabilities of P V (or P^T of P^T dO) without going through shared memory.
template <int N8>
__device__ __forceinline__ void pack_a_operand(unsigned int (&a)[4], const float (&c)[N8][4], int kk) {
  a[0] = pack2(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Copies the first `count` rows x head_dim of a (row, dim) operand into a shared tile of ROWS rows (row
// stride FAP_STRIDE), zero-filling rows beyond count and columns beyond head_dim. vector_loads: every row
// starts 16-byte aligned and head_dim % 8 == 0 (then cp.async, else element copies). A whole tile of vector
// rows (the common case) takes unrolled copies by pointer increments, without per-chunk tests.
template <int ROWS>
__device__ __forceinline__ void load_tile(storage_t* tile, const storage_t* base, long long row_stride, int count,
                                          int head_dim, int vector_loads) {
  constexpr int kChunksPerRow = FAP_HEAD_DIM / 8, kThreads = FAP_WARPS * 32;
  if (kThreads % kChunksPerRow == 0 && vector_loads && count >= ROWS && head_dim == FAP_HEAD_DIM) {
    // Each thread copies the same column of every kRowsPerPass-th row, unrolled: each copy's addresses are two
    // adds into registers of their own (in a loop, the next copy's pointer increment waited until the previous
    // cp.async had read the register: 5-7 % of the mma.sync forward's stall samples on an H200).
    constexpr int kRowsPerPass = kThreads / kChunksPerRow;
    const int first_row = threadIdx.x / kChunksPerRow, col = threadIdx.x % kChunksPerRow * 8;
    storage_t* target = tile + first_row * FAP_STRIDE + col;
    const storage_t* source = base + first_row * row_stride + col;
    const long long source_step = kRowsPerPass * row_stride;
    // Below 4 warps a thread's copies are many (16 at d = 256 with 2 warps on sm_75), and unrolled their
    // addresses spilled registers: a loop there.
    constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass, kUnroll = kThreads >= 128 ? kPasses : 1;
#pragma unroll kUnroll
    for (int pass = 0; pass < kPasses; ++pass) {
      if (ROWS % kRowsPerPass == 0 || first_row + pass * kRowsPerPass < ROWS) cp_async_16(target, source);
      target += kRowsPerPass * FAP_STRIDE;
      source += source_step;
    }
    return;
  }
  for (int chunk = threadIdx.x; chunk < ROWS * kChunksPerRow; chunk += kThreads) {
    const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 8;
    storage_t* target = tile + row * FAP_STRIDE + col;
    const storage_t* source = base + row * row_stride + col;
    if (vector_loads && row < count && col + 8 <= head_dim) {
      cp_async_16(target, source);
    } else {
      for (int e = 0; e < 8; ++e) target[e] = (row < count && col + e < head_dim) ? source[e] : (storage_t)0;
    }
  }
}

}  // namespace fap
