// Hopper (sm_90a) building blocks: shared-memory matrix descriptors for 128-byte-swizzled tiles, the
// warpgroup MMA (wgmma.mma_async) for the widths the attention kernels use and the fences around it,
// mbarriers (producer/consumer hand-offs of shared-memory tiles), bulk reductions, named barriers and
// setmaxnreg.
// No toolkit headers, like tensor_core.cuh (whose FAP_MMA_TYPES and shared_address() it uses).
//
// Tile layout (both operands of every product): a tile of ROWS rows x FAP_HEAD_DIM columns of 16-bit
// elements is stored as FAP_HEAD_DIM / 64 column blocks of ROWS rows x 128 bytes, and the 16-byte chunk c
// of row r sits at chunk c ^ (r % 8) of its row (the 128-byte swizzle the tensor cores read without bank
// conflicts). Tiles start 1024-byte aligned, so each 8-row group is one swizzle atom.
#pragma once

#include "tensor_core.cuh"
#include "tile_layouts.h"


namespace fap {

// The first 1024-byte boundary (a swizzle atom's alignment) in the dynamic shared memory from `shared_raw`, where
// the wgmma kernels' layouts start; the host asks for kSwizzleAlignmentSlack bytes more than a layout for the skip.
__device__ __forceinline__ unsigned char* swizzle_aligned(unsigned char* shared_raw) {
  constexpr unsigned int kMask = kSwizzleAlignmentSlack - 1;
  static_assert((kSwizzleAlignmentSlack & kMask) == 0, "the alignment is a power of two");
  return shared_raw + ((kSwizzleAlignmentSlack - (shared_address(shared_raw) & kMask)) & kMask);
}

// Byte offset of element (row, col) in a swizzled tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ unsigned int swizzled_offset(int row, int col) {
  return (unsigned int)((col / 64) * ROWS * 128 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) * 16) + (col % 8) * 2);
}

// One 16-byte chunk of a tile from its first `valid` elements (at most 8, none if <= 0) read one by one and
// zeros after them: for operands whose rows are not 16-byte aligned (cp.async needs that).
__device__ __forceinline__ void store_chunk_of_elements(void* target, const storage_t* from, int valid) {
  unsigned int words[4];
#pragma unroll
  for (int e = 0; e < 8; e += 2) {
    const unsigned int lo = e < valid ? from[e] : 0u, hi = e + 1 < valid ? from[e + 1] : 0u;
    words[e / 2] = lo | hi << 16;
  }
  uint4 chunk;
  chunk.x = words[0], chunk.y = words[1], chunk.z = words[2], chunk.w = words[3];
  *reinterpret_cast<uint4*>(target) = chunk;
}

// The copy of a whole tile by THREADS threads with cp.async: ROWS rows x FAP_HEAD_DIM of a (row, dim) operand whose
// rows are all inside it (count >= ROWS), as wide as the tile (head_dim == FAP_HEAD_DIM) and 16-byte aligned
// (vector_loads), most tiles of a call. Each thread copies one 16-byte column chunk of every kRowsPerPass-th row,
// without bounds, and the swizzle's row phase is its first row's in every pass (or flipped by 4 rows every other
// pass), so each copy is a pointer step and a constant shared-memory offset: about 2 instructions instead of 8 with
// the checks (+3-11 % for the Hopper forward on an H200). False, nothing copied, for other tiles.
template <int ROWS, int THREADS>
__device__ __forceinline__ bool copy_whole_tile(unsigned char* tile, const storage_t* source, long long row_stride,
                                                int count, int head_dim, int vector_loads) {
  constexpr int kChunksPerRow = FAP_HEAD_DIM / 8, kRowsPerPass = THREADS / kChunksPerRow;
  if constexpr (THREADS % kChunksPerRow != 0 || kRowsPerPass % 4 != 0 || ROWS % kRowsPerPass != 0) {
    return false;
  } else {
    if (!vector_loads || count < ROWS || head_dim != FAP_HEAD_DIM) return false;
    const int col = threadIdx.x % kChunksPerRow * 8, first_row = threadIdx.x / kChunksPerRow;
    const unsigned int first = shared_address(tile) + swizzled_offset<ROWS>(first_row, col),
                       flipped = shared_address(tile) + swizzled_offset<ROWS>(first_row + 4, col) - 4 * 128;
    const storage_t* from = source + first_row * row_stride + col;
#pragma unroll
    for (int pass = 0; pass < ROWS / kRowsPerPass; ++pass, from += kRowsPerPass * row_stride) {
      const bool odd_phase = kRowsPerPass % 8 == 4 && pass % 2 == 1;
      cp_async_16_to((odd_phase ? flipped : first) + pass * kRowsPerPass * 128, from);
    }
    return true;
  }
}

// A wgmma shared-memory descriptor with the 128-byte swizzle: start address, leading and stride byte
// offsets (the PTX ISA's "matrix descriptor"; offsets in 16-byte units).
__device__ __forceinline__ unsigned long long smem_descriptor(unsigned int address, unsigned int leading_bytes,
                                                              unsigned int stride_bytes) {
  return (unsigned long long)((address & 0x3FFFFu) >> 4) | ((unsigned long long)(leading_bytes >> 4) << 16) |
         ((unsigned long long)(stride_bytes >> 4) << 32) | (1ull << 62);
}

// K-major operand (rows x k, k contiguous): the 16-column step `kk` of a tile of ROWS rows, from `row0`.
// Rows advance by 128 bytes inside an 8-row atom and by 1024 bytes between atoms.
template <int ROWS>
__device__ __forceinline__ unsigned long long k_major_descriptor(unsigned int tile, int row0, int kk) {
  return smem_descriptor(tile + (kk * 16 / 64) * ROWS * 128 + row0 * 128 + (kk * 16 % 64) * 2, 16, 1024);
}

// MN-major operand (k rows x n columns, n contiguous, e.g. V for P V): the 16-row step `kk` of a tile of
// ROWS rows; the n dimension crosses 64-column blocks ROWS * 128 bytes apart.
template <int ROWS>
__device__ __forceinline__ unsigned long long mn_major_descriptor(unsigned int tile, int kk) {
  return smem_descriptor(tile + kk * 16 * 128, ROWS * 128, 1024);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}
// Shared memory written through the generic proxy (st.shared, cp.async) and read next by wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarriers: an 8-byte shared-memory object counting arrivals; each time `count` threads have arrived its
// phase completes and its parity bit flips.
__device__ __forceinline__ void mbarrier_init(unsigned int barrier, unsigned int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(barrier), "r"(count) : "memory");
}
// Makes initialised mbarriers visible to the other threads (a __syncthreads must follow).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned int barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(barrier) : "memory");
}
// Arrives once all cp.async copies this thread issued so far have landed (counted in the init count).
__device__ __forceinline__ void mbarrier_arrive_after_copies(unsigned int barrier) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(barrier) : "memory");
}
// Waits until the phase with this parity has completed (a fresh barrier is in phase 0, so waiting for
// parity 1 returns at once).
__device__ __forceinline__ void mbarrier_wait(unsigned int barrier, unsigned int parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(barrier),
      "r"(parity)
      : "memory");
}

// Bulk reductions by the TMA unit: `bytes` (a multiple of 16, both addresses 16-byte aligned) of fp32 from
// shared memory added element by element to global memory, without holding the issuing thread. Each thread's
// reductions are grouped like cp.async copies; a group's shared memory may be reused once it has been read.
__device__ __forceinline__ void bulk_reduce_add(float* target, unsigned int source, unsigned int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(target), "r"(source),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most PENDING of this thread's groups still read their shared memory.
template <int PENDING>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(PENDING) : "memory");
}
// Waits until at most PENDING of this thread's groups are incomplete (their writes done).
template <int PENDING>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// Counters in global memory that order work across CTAs (gpu scope): a load that later reads and writes do not
// pass, an addition that earlier ones do not pass, and the order between this thread's generic accesses and its
// async-proxy ones (bulk copies and reductions) to global memory.
__device__ __forceinline__ int load_acquire(const int* counter) {
  int value;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(value) : "l"(counter) : "memory");
  return value;
}
__device__ __forceinline__ void add_release(int* counter, int value) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(value) : "memory");
}
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// Named barriers 1..15 among `threads` threads (0 is __syncthreads'): sync waits for all, arrive does not.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Hands registers between warpgroups: the kernel starts with an even share (__launch_bounds__(threads, 1)),
// then each warpgroup role lowers or raises its own.
template <int REGISTERS>
__device__ __forceinline__ void lower_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}
template <int REGISTERS>
__device__ __forceinline__ void raise_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}

// Keeps the compiler from moving accesses to accumulator registers across the asynchronous MMAs.
template <int COUNT>
__device__ __forceinline__ void fence_registers(float* registers) {
#pragma unroll
  for (int i = 0; i < COUNT; ++i) asm volatile("" : "+f"(registers[i])::"memory");
}

// D (64 x N fp32, the warpgroup's accumulator fragment) (+)= A (64 x 16) B (16 x N). wgmma_ss reads A and B
// from shared memory (N = 32, 64, 80, 128): K-major descriptors, or MN-major where `transpose` says so; wgmma_rs
// (N = 64 .. 256) takes A from registers (four 32-bit registers per thread in mma.sync's m16n8k16 A layout,
// each warp its 16 rows) and B MN-major. accumulate = 0 overwrites D.
enum class Transpose { kNone, kB, kBoth };  // which shared-memory operands are MN-major

#define FAP_ACC8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                       "+f"(d[i + 6]), "+f"(d[i + 7])

template <int N, int TRANSPOSE_A, int TRANSPOSE_B>
struct WgmmaSS;
template <int TRANSPOSE_A, int TRANSPOSE_B>
struct WgmmaSS<32, TRANSPOSE_A, TRANSPOSE_B> {
  static __device__ __forceinline__ void run(float* d, unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." FAP_MMA_TYPES " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, %19, %20;\n}\n"
        : FAP_ACC8(d, 0), FAP_ACC8(d, 8)
        : "l"(a), "l"(b), "r"(accumulate), "n"(TRANSPOSE_A), "n"(TRANSPOSE_B));
  }
};
template <int TRANSPOSE_A, int TRANSPOSE_B>
struct WgmmaSS<64, TRANSPOSE_A, TRANSPOSE_B> {
  static __device__ __forceinline__ void run(float* d, unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." FAP_MMA_TYPES " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %35, %36;\n}\n"
        : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24)
        : "l"(a), "l"(b), "r"(accumulate), "n"(TRANSPOSE_A), "n"(TRANSPOSE_B));
  }
};
template <int TRANSPOSE_A, int TRANSPOSE_B>
struct WgmmaSS<80, TRANSPOSE_A, TRANSPOSE_B> {
  static __device__ __forceinline__ void run(float* d, unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %42, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n80k16.f32." FAP_MMA_TYPES " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, "
        "%40, %41, p, 1, 1, %43, %44;\n}\n"
        : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24), FAP_ACC8(d, 32)
        : "l"(a), "l"(b), "r"(accumulate), "n"(TRANSPOSE_A), "n"(TRANSPOSE_B));
  }
};
template <int TRANSPOSE_A, int TRANSPOSE_B>
struct WgmmaSS<128, TRANSPOSE_A, TRANSPOSE_B> {
  static __device__ __forceinline__ void run(float* d, unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." FAP_MMA_TYPES " "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, %67, %68;\n}\n"
        : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24), FAP_ACC8(d, 32), FAP_ACC8(d, 40), FAP_ACC8(d, 48), FAP_ACC8(d, 56)
        : "l"(a), "l"(b), "r"(accumulate), "n"(TRANSPOSE_A), "n"(TRANSPOSE_B));
  }
};

template <int N>
__device__ __forceinline__ void wgmma_ss(float* d, unsigned long long a, unsigned long long b, int accumulate,
                                         Transpose transpose = Transpose::kNone) {
  if (transpose == Transpose::kNone) {
    WgmmaSS<N, 0, 0>::run(d, a, b, accumulate);
  } else if (transpose == Transpose::kB) {
    WgmmaSS<N, 0, 1>::run(d, a, b, accumulate);
  } else {
    WgmmaSS<N, 1, 1>::run(d, a, b, accumulate);
  }
}
template <int N>
__device__ __forceinline__ void wgmma_rs(float* d, const unsigned int* a, unsigned long long b, int accumulate);

template <>
__device__ __forceinline__ void wgmma_rs<64>(float* d, const unsigned int* a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." FAP_MMA_TYPES " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_rs<128>(float* d, const unsigned int* a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." FAP_MMA_TYPES " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24), FAP_ACC8(d, 32), FAP_ACC8(d, 40), FAP_ACC8(d, 48), FAP_ACC8(d, 56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_rs<192>(float* d, const unsigned int* a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %101, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32." FAP_MMA_TYPES " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
      "{%96, %97, %98, %99}, %100, p, 1, 1, 1;\n}\n"
      : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24), FAP_ACC8(d, 32), FAP_ACC8(d, 40), FAP_ACC8(d, 48), FAP_ACC8(d, 56), FAP_ACC8(d, 64), FAP_ACC8(d, 72), FAP_ACC8(d, 80), FAP_ACC8(d, 88)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_rs<256>(float* d, const unsigned int* a, unsigned long long b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." FAP_MMA_TYPES " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : FAP_ACC8(d, 0), FAP_ACC8(d, 8), FAP_ACC8(d, 16), FAP_ACC8(d, 24), FAP_ACC8(d, 32), FAP_ACC8(d, 40), FAP_ACC8(d, 48), FAP_ACC8(d, 56), FAP_ACC8(d, 64), FAP_ACC8(d, 72), FAP_ACC8(d, 80), FAP_ACC8(d, 88), FAP_ACC8(d, 96), FAP_ACC8(d, 104), FAP_ACC8(d, 112), FAP_ACC8(d, 120)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

}  // namespace fap
