// Attention backward for Hopper (sm_90a), the main kernel on warpgroup MMAs (the preprocess and conversion
// kernels around it are in attention_bwd_common.cuh). One CTA per (block of FAP_BLOCK_N = 128 keys, batch,
// kv head), two warpgroups of 64 keys; it loops over the group's query heads and the blocks of
// FAP_BLOCK_M = 64 queries that can see its keys. Per step, each warpgroup:
//   S^T = K Q^T and dP^T = V dO^T        (64 keys x 64 queries, both operands in shared memory)
//   P^T, dS^T = P^T (dP^T - D)           (registers, from the forward's LSE)
//   dV += P^T dO, dK += dS^T Q           (P^T and dS^T from registers; dK, dV stay in registers)
//   dQ += dS K                           (dS^T through shared memory, both operands transposed; d = 128: half
//                                        the columns over all 128 keys, d = 64: all over its own keys),
//                                        added to the fp32 accumulator with vector atomics
// Q and dO tiles (with LSE and D) are double-buffered with cp.async in the 128-byte-swizzled layout wgmma
// reads (hopper.cuh). Every CTA (and, where dQ is split by keys, both its warpgroups) adds to each dQ
// element: no fixed order, so the deterministic mode and dropout use the mma.sync kernel (the dispatch
// table decides).
//
// Compile-time configuration: FAP_HEAD_DIM (64 or 128), FAP_BLOCK_M (64), FAP_BLOCK_N (128), FAP_WARPS (8),
// FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_WINDOW. Needs philox.h, mask.h, attention_params.cuh,
// tensor_core.cuh, hopper.cuh and attention_bwd_common.cuh before it.

// How dQ = dS K is shared between the warpgroups: by columns (d = 128; a 32-column half at d = 64 would start
// inside a swizzle row) unless softcap's registers make that spill; else by keys.
#define FAP_DQ_BY_COLUMNS (FAP_HEAD_DIM == 128 && !FAP_SOFTCAP)

namespace fap {

// Copies `count` rows x head_dim of a (row, dim) operand into a swizzled tile of ROWS x FAP_HEAD_DIM,
// zero-filling the rest; all threads of the CTA, each a fixed 16-byte column chunk of every few rows.
template <int ROWS>
__device__ __forceinline__ void load_swizzled_tile(unsigned char* tile, const storage_t* source, long long row_stride,
                                                   int count, int head_dim, int vector_loads) {
  constexpr int kChunksPerRow = FAP_HEAD_DIM / 8, kRowsPerPass = FAP_WARPS * 32 / kChunksPerRow;
  const int col = threadIdx.x % kChunksPerRow * 8;
  const storage_t* from = source + threadIdx.x / kChunksPerRow * row_stride + col;
#pragma unroll 4
  for (int row = threadIdx.x / kChunksPerRow; row < ROWS; row += kRowsPerPass, from += kRowsPerPass * row_stride) {
    unsigned char* target = tile + swizzled_offset<ROWS>(row, col);
    if (vector_loads) {
      const bool inside = row < count && col < head_dim;
      cp_async_16_or_zero(target, inside ? from : source, inside);
    } else {
      store_chunk_of_elements(target, from, row < count ? head_dim - col : 0);
    }
  }
}

// S^T -> P^T and dP^T -> dS^T = P^T (dP^T - D) (times the softcap's derivative) in place, for one
// warpgroup's 64 keys x FAP_BLOCK_M queries; MASKED tiles cross a mask boundary (separate code, so that the
// others pay nothing for it).
template <bool MASKED>
__device__ __forceinline__ void softmax_gradients(float (&st)[FAP_BLOCK_M / 8][4], float (&dpt)[FAP_BLOCK_M / 8][4],
                                                  const AttentionBwdParams& p, const SequenceRows& s, float slope,
                                                  int q0, int key0, const int (&key_local)[2], const float* lse,
                                                  const float* dsum) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < FAP_BLOCK_M / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int query_local = j * 8 + quad * 2 + e % 2;
      float cap_derivative;
      const float prob = backward_probability<MASKED>(st[j][e], p, s, slope, q0 + query_local, key0 + key_local[e / 2],
                                                      lse[query_local], &cap_derivative);
      st[j][e] = prob;
      dpt[j][e] = prob * (dpt[j][e] - dsum[query_local]) * cap_derivative;
    }
}

// Four fp32 additions to consecutive (16-byte aligned) addresses, one instruction (sm_90).
__device__ __forceinline__ void atomic_add4(float* target, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(target), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

// Adds a warp's 16 rows x (8 * COLUMNS8) columns of accumulator (mma layout: this thread holds rows lane / 4
// and + 8, columns 8 i + 2 quad, + 1) to a row-major fp32 buffer, 16 bytes per atomic: lanes with quad 2 m
// and 2 m + 1 swap halves so that one holds 4 columns of the upper row and the other of the lower.
template <int COLUMNS8>
__device__ __forceinline__ void add_rows_atomically(const float (&acc)[COLUMNS8][4], float* upper_row, float* lower_row,
                                                    bool upper_inside, bool lower_inside) {
  const int quad = threadIdx.x % 4;
  const bool odd = quad & 1;
  float* row = odd ? lower_row : upper_row;
  const bool inside = odd ? lower_inside : upper_inside;
  const int col = (quad / 2) * 4;
#pragma unroll
  for (int i = 0; i < COLUMNS8; ++i) {
    // Even lanes send their lower-row pair and keep the upper; odd lanes the other way round.
    const float send0 = odd ? acc[i][0] : acc[i][2], send1 = odd ? acc[i][1] : acc[i][3];
    const float got0 = __shfl_xor_sync(0xffffffffu, send0, 1), got1 = __shfl_xor_sync(0xffffffffu, send1, 1);
    if (!inside) continue;
    if (odd) {
      atomic_add4(row + i * 8 + col, got0, got1, acc[i][2], acc[i][3]);
    } else {
      atomic_add4(row + i * 8 + col, acc[i][0], acc[i][1], got0, got1);
    }
  }
}

// Grid (key blocks, batch, kv heads), 256 threads.
extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_bwd(const AttentionBwdParams p) {
  constexpr int kKvBytes = FAP_BLOCK_N * FAP_HEAD_DIM * 2, kQBytes = FAP_BLOCK_M * FAP_HEAD_DIM * 2;
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  // The swizzle atoms need 1024-byte alignment; the host adds 1024 bytes for this.
  unsigned char* k_tile = shared_raw + ((1024 - (shared_address(shared_raw) & 1023)) & 1023);
  unsigned char* v_tile = k_tile + kKvBytes;
  unsigned char* q_tiles = v_tile + kKvBytes;        // 2 stages
  unsigned char* do_tiles = q_tiles + 2 * kQBytes;   // 2 stages
  unsigned char* ds_tile = do_tiles + 2 * kQBytes;   // dS^T: FAP_BLOCK_N keys x FAP_BLOCK_M queries, swizzled
  float* lse_rows = reinterpret_cast<float*>(ds_tile + FAP_BLOCK_N * FAP_BLOCK_M * 2);  // 2 stages, base 2
  float* dsum_rows = lse_rows + 2 * FAP_BLOCK_M;

  const int batch = blockIdx.y, kv_head = blockIdx.z, key_block = blockIdx.x;
  const SequenceRows s = sequence_rows(p, batch);
  const int key0 = key_block * FAP_BLOCK_N;
  if (key0 >= s.len_k) return;
  // Broadcast from lane 0 so that the compiler knows the warpgroup is uniform in each warp.
  const int warpgroup = __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0);
  const int warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32, quad = lane % 4;
  const int key_local[2] = {warpgroup * 64 + warp * 16 + lane / 4, warpgroup * 64 + warp * 16 + lane / 4 + 8};

  const QueryBlocks blocks = query_blocks_for_keys<FAP_BLOCK_M, FAP_BLOCK_N>(p, s, key0);
  const int first_block = blocks.first, query_blocks = blocks.count;
  const int steps = query_blocks * p.group_size;  // (query head of the group, query block) pairs

  const auto step_head = [&](int step) { return kv_head * p.group_size + step / query_blocks; };
  const auto step_q0 = [&](int step) { return (first_block + step % query_blocks) * FAP_BLOCK_M; };
  // Issues the loads of step `step` into stage `stage`: Q and dO tiles by cp.async, LSE and D directly.
  const auto load_step = [&](int step, int stage) {
    const int head = step_head(step), q0 = step_q0(step);
    load_swizzled_tile<FAP_BLOCK_M>(q_tiles + stage * kQBytes,
                                    static_cast<const storage_t*>(p.q) + batch * p.q_batch_stride +
                                        (s.q_start + q0) * p.q_row_stride + head * p.q_head_stride,
                                    p.q_row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
    load_swizzled_tile<FAP_BLOCK_M>(do_tiles + stage * kQBytes,
                                    static_cast<const storage_t*>(p.dout) + batch * p.dout_batch_stride +
                                        (s.q_start + q0) * p.dout_row_stride + head * p.dout_head_stride,
                                    p.dout_row_stride, s.len_q - q0, p.head_dim, p.vector_loads);
    load_softmax_rows<FAP_BLOCK_M>(lse_rows + stage * FAP_BLOCK_M, dsum_rows + stage * FAP_BLOCK_M, p, s, batch, head, q0);
  };

  load_swizzled_tile<FAP_BLOCK_N>(k_tile,
                                  static_cast<const storage_t*>(p.k) + batch * p.k_batch_stride +
                                      (s.k_start + key0) * p.k_row_stride + kv_head * p.k_head_stride,
                                  p.k_row_stride, s.len_k - key0, p.head_dim, p.vector_loads);
  load_swizzled_tile<FAP_BLOCK_N>(v_tile,
                                  static_cast<const storage_t*>(p.v) + batch * p.v_batch_stride +
                                      (s.k_start + key0) * p.v_row_stride + kv_head * p.v_head_stride,
                                  p.v_row_stride, s.len_k - key0, p.head_dim, p.vector_loads);
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  const unsigned int k_address = shared_address(k_tile), v_address = shared_address(v_tile),
                     ds_address = shared_address(ds_tile);
  float dk[FAP_HEAD_DIM / 8][4], dv[FAP_HEAD_DIM / 8][4];
#pragma unroll
  for (int i = 0; i < FAP_HEAD_DIM / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.0f;

  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1, head = step_head(step), q0 = step_q0(step);
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // this stage's tiles are in; every warpgroup is done with the other stage
    const unsigned int q_address = shared_address(q_tiles + stage * kQBytes),
                       do_address = shared_address(do_tiles + stage * kQBytes);
    const float* lse_stage = lse_rows + stage * FAP_BLOCK_M;
    const float* dsum_stage = dsum_rows + stage * FAP_BLOCK_M;

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 keys.
    float st[FAP_BLOCK_M / 8][4], dpt[FAP_BLOCK_M / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
      wgmma_ss<FAP_BLOCK_M>(&st[0][0], k_major_descriptor<FAP_BLOCK_N>(k_address, warpgroup * 64, kk),
                            k_major_descriptor<FAP_BLOCK_M>(q_address, 0, kk), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
      wgmma_ss<FAP_BLOCK_M>(&dpt[0][0], k_major_descriptor<FAP_BLOCK_N>(v_address, warpgroup * 64, kk),
                            k_major_descriptor<FAP_BLOCK_M>(do_address, 0, kk), kk > 0);
    }
    wgmma_commit();
    // The next step's loads while the products run: its LSE and D loads stall their warps until the data
    // arrive, which must not hold back a warpgroup's wgmma issue.
    if (step + 1 < steps) load_step(step + 1, stage ^ 1);
    cp_async_commit();
    wgmma_wait<0>();
    fence_registers<FAP_BLOCK_M / 2>(&st[0][0]);
    fence_registers<FAP_BLOCK_M / 2>(&dpt[0][0]);

    // P^T and dS^T (the derivative with respect to the scaled, capped score), in place.
    const bool needs_mask = step_needs_mask<FAP_BLOCK_M, FAP_BLOCK_N>(p, s, q0, key0);
    const float slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;
    if (needs_mask) {
      softmax_gradients<true>(st, dpt, p, s, slope, q0, key0, key_local, lse_stage, dsum_stage);
    } else {
      softmax_gradients<false>(st, dpt, p, s, slope, q0, key0, key_local, lse_stage, dsum_stage);
    }
    unsigned int p_frag[FAP_BLOCK_M / 16][4], ds_frag[FAP_BLOCK_M / 16][4];
#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk) {
      p_frag[kk][0] = pack2(st[2 * kk][0], st[2 * kk][1]);
      p_frag[kk][1] = pack2(st[2 * kk][2], st[2 * kk][3]);
      p_frag[kk][2] = pack2(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      p_frag[kk][3] = pack2(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      ds_frag[kk][0] = pack2(dpt[2 * kk][0], dpt[2 * kk][1]);
      ds_frag[kk][1] = pack2(dpt[2 * kk][2], dpt[2 * kk][3]);
      ds_frag[kk][2] = pack2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      ds_frag[kk][3] = pack2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
    }

    // dV += P^T dO and dK += dS^T Q (dO and Q as k x n operands: queries x head dim).
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk)
      wgmma_rs<FAP_HEAD_DIM>(&dv[0][0], p_frag[kk], mn_major_descriptor<FAP_BLOCK_M>(do_address, kk), 1);
#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk)
      wgmma_rs<FAP_HEAD_DIM>(&dk[0][0], ds_frag[kk], mn_major_descriptor<FAP_BLOCK_M>(q_address, kk), 1);
    wgmma_commit();

    // dS^T of this warpgroup's keys into shared memory, [key][query] swizzled: the A operand of dQ = dS K
    // read transposed.
#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_M / 16; ++kk)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          *reinterpret_cast<unsigned int*>(ds_tile + swizzled_offset<FAP_BLOCK_N>(key_local[half], kk * 16 + n * 8 + quad * 2)) =
              ds_frag[kk][2 * n + half];
        }
    fence_proxy_async();
#if FAP_DQ_BY_COLUMNS
    __syncthreads();  // both warpgroups' dS^T rows are complete
#else
    named_barrier_sync(1 + warpgroup, 128);  // the warpgroup's dS^T rows are complete
#endif
    wgmma_wait<0>();  // dV, dK done (with dQ's accumulator in flight too, d = 128 would spill)
    fence_registers<FAP_HEAD_DIM / 2>(&dv[0][0]);
    fence_registers<FAP_HEAD_DIM / 2>(&dk[0][0]);

    // dQ += dS K. FAP_DQ_BY_COLUMNS: each warpgroup takes 64 of the columns over all 128 keys, so that every dQ
    // element gets one atomic per CTA (the atomics were the kernel's bottleneck); else each takes every column
    // over its own 64 keys.
    constexpr int kDqColumns = FAP_DQ_BY_COLUMNS ? 64 : FAP_HEAD_DIM, kDqKeys = FAP_DQ_BY_COLUMNS ? 128 : 64;
    const unsigned int ds_keys = FAP_DQ_BY_COLUMNS ? ds_address : ds_address + warpgroup * 64 * 128;
    const unsigned int k_part = FAP_DQ_BY_COLUMNS ? k_address + warpgroup * FAP_BLOCK_N * 128
                                                  : k_address + warpgroup * 64 * 128;
    const int dq_col0 = FAP_DQ_BY_COLUMNS ? warpgroup * 64 : 0;
    float dq[kDqColumns / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDqKeys / 16; ++kk) {
      wgmma_ss<kDqColumns>(&dq[0][0], mn_major_descriptor<FAP_BLOCK_N>(ds_keys, kk),
                           mn_major_descriptor<FAP_BLOCK_N>(k_part, kk), kk > 0, Transpose::kBoth);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers<kDqColumns / 2>(&dq[0][0]);
    const int upper = q0 + warp * 16 + lane / 4;
    const auto dq_row = [&](int row) {
      return p.dq_accum + ((long long)(s.global_row0 + row) * p.heads_q + head) * FAP_HEAD_DIM + dq_col0;
    };
    add_rows_atomically(dq, dq_row(upper), dq_row(upper + 8), upper < s.len_q, upper + 8 < s.len_q);
  }
  cp_async_wait_all();  // a key block no query sees still has its tile loads in flight

  // dK and dV for this warpgroup's keys.
#pragma unroll
  for (int half = 0; half < 2; ++half) store_key_gradients(p, s, batch, kv_head, key0 + key_local[half], half, 0, dk, dv);
}

}  // namespace fap
