// Attention forward for sm_80+ (FlashAttention-2's algorithm on tensor cores): one CTA per (block of
// BLOCK_M query rows, batch, head), one warp per 16 * ROW_TILES rows (each K/V fragment read from shared
// memory serves ROW_TILES row tiles). Key/value tiles of BLOCK_N rows are brought into
// shared memory with cp.async (two stages, the next tile loading while this one is computed); S = Q K^T and
// O += P V run on mma.sync.m16n8k16 with fp32 accumulation; the online softmax works in the base-2 domain
// on the accumulator registers.
//
// Compile-time configuration (defines, set by the host's KernelConfig):
//   FAP_HEAD_DIM  head dim rounded up to a multiple of 16     FAP_BLOCK_M, FAP_BLOCK_N, FAP_WARPS, FAP_ROW_TILES
//   FAP_BF16      1: bfloat16, 0: float16                      FAP_SOFTCAP, FAP_ALIBI, FAP_DROPOUT, FAP_WINDOW
//   FAP_MIN_BLOCKS  0 or 1 (see the launch bounds below)
// Needs philox.h, mask.h, attention_params.cuh and tensor_core.cuh before it (the host concatenates the
// sources).

namespace fap {

// FAP_MIN_BLOCKS = 1 lets ptxas use every register (dropout's Philox rounds need them); 0 leaves the
// default, which keeps two 8-warp CTAs per SM.
#if FAP_MIN_BLOCKS
#define FAP_FWD_LAUNCH_BOUNDS __launch_bounds__(FAP_WARPS * 32, FAP_MIN_BLOCKS)
#else
#define FAP_FWD_LAUNCH_BOUNDS __launch_bounds__(FAP_WARPS * 32)
#endif

extern "C" __global__ void FAP_FWD_LAUNCH_BOUNDS attention_fwd(const AttentionFwdParams p) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  storage_t* q_tile = reinterpret_cast<storage_t*>(shared_bytes);
  storage_t* k_tiles = q_tile + FAP_BLOCK_M * FAP_STRIDE;         // 2 stages
  storage_t* v_tiles = k_tiles + 2 * FAP_BLOCK_N * FAP_STRIDE;    // 2 stages

  const int block = blockIdx.x, batch = blockIdx.y, head = blockIdx.z;
  const int kv_head = head / p.group_size;
  long long q_start = 0, k_start = 0;
  int len_q = p.seqlen_q, len_k = p.seqlen_k;
  if (p.cu_seqlens_q) {
    q_start = p.cu_seqlens_q[batch];
    k_start = p.cu_seqlens_k[batch];
    len_q = p.cu_seqlens_q[batch + 1] - (int)q_start;
    len_k = p.cu_seqlens_k[batch + 1] - (int)k_start;
  }
  const int row_begin = block * FAP_BLOCK_M;
  if (row_begin >= len_q) return;

  const storage_t* q = static_cast<const storage_t*>(p.q) + batch * p.q_batch_stride + (q_start + row_begin) * p.q_row_stride + head * p.q_head_stride;
  const storage_t* k = static_cast<const storage_t*>(p.k) + batch * p.k_batch_stride + k_start * p.k_row_stride + kv_head * p.k_head_stride;
  const storage_t* v = static_cast<const storage_t*>(p.v) + batch * p.v_batch_stride + k_start * p.v_row_stride + kv_head * p.v_head_stride;

  // Keys any row of this block may see (the mask is monotone in the row).
  const long long offset = (long long)len_k - len_q;
  long long key_begin = 0, key_end = len_k;
#if FAP_WINDOW
  {
    const long long first = row_begin + offset - p.window_left;
    const long long last = (long long)min(row_begin + FAP_BLOCK_M, len_q) - 1 + offset + p.window_right + 1;
    key_begin = first > 0 ? first : 0;
    key_end = last < len_k ? last : len_k;
  }
#endif
  const int first_tile = (int)(key_begin / FAP_BLOCK_N);
  const int end_tile = key_end > key_begin ? (int)((key_end + FAP_BLOCK_N - 1) / FAP_BLOCK_N) : first_tile;

  load_tile<FAP_BLOCK_M>(q_tile, q, p.q_row_stride, len_q - row_begin, p.head_dim, p.vector_loads);
  if (first_tile < end_tile) {
    const int key0 = first_tile * FAP_BLOCK_N;
    load_tile<FAP_BLOCK_N>(k_tiles, k + key0 * p.k_row_stride, p.k_row_stride, len_k - key0, p.head_dim, p.vector_loads);
    load_tile<FAP_BLOCK_N>(v_tiles, v + key0 * p.v_row_stride, p.v_row_stride, len_k - key0, p.head_dim, p.vector_loads);
  }
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  // Row tile t of this warp covers block rows warp_row + 16 t .. + 15; this thread holds rows group and
  // group + 8 of each tile.
  const int warp_row = warp * 16 * FAP_ROW_TILES;
  int rows[FAP_ROW_TILES][2];
#pragma unroll
  for (int t = 0; t < FAP_ROW_TILES; ++t) {
    rows[t][0] = row_begin + warp_row + 16 * t + group;
    rows[t][1] = rows[t][0] + 8;
  }

  float acc[FAP_ROW_TILES][FAP_HEAD_DIM / 8][4];
  float row_max[FAP_ROW_TILES][2], row_sum[FAP_ROW_TILES][2];
#pragma unroll
  for (int t = 0; t < FAP_ROW_TILES; ++t) {
#pragma unroll
    for (int i = 0; i < FAP_HEAD_DIM / 8; ++i) acc[t][i][0] = acc[t][i][1] = acc[t][i][2] = acc[t][i][3] = 0.0f;
    row_max[t][0] = row_max[t][1] = -FAP_INFINITY;
    row_sum[t][0] = row_sum[t][1] = 0.0f;
  }
#if FAP_ALIBI
  const float slope = p.alibi[batch * p.alibi_batch_stride + head];
#endif

  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int stage = (tile - first_tile) & 1;
    cp_async_wait_all();
    __syncthreads();
    if (tile + 1 < end_tile) {  // prefetch the next tile into the other stage
      const int key0 = (tile + 1) * FAP_BLOCK_N;
      load_tile<FAP_BLOCK_N>(k_tiles + (stage ^ 1) * FAP_BLOCK_N * FAP_STRIDE, k + key0 * p.k_row_stride,
                             p.k_row_stride, len_k - key0, p.head_dim, p.vector_loads);
      load_tile<FAP_BLOCK_N>(v_tiles + (stage ^ 1) * FAP_BLOCK_N * FAP_STRIDE, v + key0 * p.v_row_stride,
                             p.v_row_stride, len_k - key0, p.head_dim, p.vector_loads);
    }
    cp_async_commit();
    const storage_t* k_tile = k_tiles + stage * FAP_BLOCK_N * FAP_STRIDE;
    const storage_t* v_tile = v_tiles + stage * FAP_BLOCK_N * FAP_STRIDE;
    const int m = lane / 8, r = lane % 8;  // ldmatrix: this lane addresses row r of matrix m

    // S = Q K^T: BLOCK_N / 8 accumulator tiles of 16x8 per row tile.
    float s[FAP_ROW_TILES][FAP_BLOCK_N / 8][4];
#pragma unroll
    for (int t = 0; t < FAP_ROW_TILES; ++t)
#pragma unroll
      for (int j = 0; j < FAP_BLOCK_N / 8; ++j) s[t][j][0] = s[t][j][1] = s[t][j][2] = s[t][j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
      unsigned int a[FAP_ROW_TILES][4];
#pragma unroll
      for (int t = 0; t < FAP_ROW_TILES; ++t)
        ldmatrix_x4(a[t], q_tile + (warp_row + 16 * t + (m % 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m / 2) * 8);
#pragma unroll
      for (int j = 0; j < FAP_BLOCK_N / 16; ++j) {
        unsigned int b[4];
        ldmatrix_x4(b, k_tile + (j * 16 + (m / 2) * 8 + r) * FAP_STRIDE + kk * 16 + (m % 2) * 8);
#pragma unroll
        for (int t = 0; t < FAP_ROW_TILES; ++t) {
          mma_16816(s[t][2 * j], a[t], b[0], b[1]);
          mma_16816(s[t][2 * j + 1], a[t], b[2], b[3]);
        }
      }
    }

    const int key0 = tile * FAP_BLOCK_N;
    // Most tiles lie wholly inside every row's allowed keys: only the others pay for the mask.
    bool needs_mask = key0 + FAP_BLOCK_N > len_k;
#if FAP_WINDOW
    needs_mask = needs_mask || key0 < (long long)row_begin + FAP_BLOCK_M - 1 + offset - p.window_left ||
                 key0 + FAP_BLOCK_N - 1 > (long long)row_begin + offset + p.window_right;
#endif
#pragma unroll
    for (int t = 0; t < FAP_ROW_TILES; ++t) {
      // Scores in base-2 units (log2(e) folded in), masked to -inf outside the allowed keys.
      float tile_max[2] = {-FAP_INFINITY, -FAP_INFINITY};
#pragma unroll
      for (int j = 0; j < FAP_BLOCK_N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const long long row = rows[t][half];
          const long long key = key0 + j * 8 + quad * 2 + (e % 2);
          float x = s[t][j][e];
#if FAP_SOFTCAP || FAP_ALIBI
          x *= p.scale;
#if FAP_SOFTCAP
          x = p.softcap * tanhf(x / p.softcap);
#endif
#if FAP_ALIBI
          x += alibi_bias(slope, row, key, len_q, len_k);
#endif
          x *= 1.4426950408889634f;
#else
          x *= p.scale_log2;
#endif
          if (needs_mask) {
            bool allowed = key < len_k;
#if FAP_WINDOW
            allowed = allowed && key >= row + offset - p.window_left && key <= row + offset + p.window_right;
#endif
            if (!allowed) x = -FAP_INFINITY;
          }
          s[t][j][e] = x;
          tile_max[half] = fmaxf(tile_max[half], s[t][j][e]);
        }
      float correction[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
        tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
        const float new_max = fmaxf(row_max[t][half], tile_max[half]);
        // A row with nothing allowed so far keeps max -inf: use 0 as the shift so exp2 gives exact zeros.
        const float shift = new_max == -FAP_INFINITY ? 0.0f : new_max;
        correction[half] = exp2f(row_max[t][half] - shift);
        row_max[t][half] = new_max;
        row_sum[t][half] *= correction[half];
#pragma unroll
        for (int j = 0; j < FAP_BLOCK_N / 8; ++j) {
          s[t][j][2 * half] = exp2f(s[t][j][2 * half] - shift);
          s[t][j][2 * half + 1] = exp2f(s[t][j][2 * half + 1] - shift);
          row_sum[t][half] += s[t][j][2 * half] + s[t][j][2 * half + 1];  // per-thread partial, reduced at the end
        }
      }
#pragma unroll
      for (int i = 0; i < FAP_HEAD_DIM / 8; ++i) {
        acc[t][i][0] *= correction[0];
        acc[t][i][1] *= correction[0];
        acc[t][i][2] *= correction[1];
        acc[t][i][3] *= correction[1];
      }
#if FAP_DROPOUT
#pragma unroll
      for (int j = 0; j < FAP_BLOCK_N / 8; ++j)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const unsigned int key = (unsigned int)(key0 + j * 8 + quad * 2);
          const Philox4 words = dropout_words(p.dropout_seed, p.dropout_offset,
                                              (unsigned int)(batch * p.heads_q + head), (unsigned int)rows[t][half],
                                              key / 4);
          const unsigned int w0 = philox_word(words, key % 4), w1 = philox_word(words, key % 4 + 1);
          s[t][j][2 * half] *= w0 >= p.dropout_threshold ? p.dropout_scale : 0.0f;
          s[t][j][2 * half + 1] *= w1 >= p.dropout_threshold ? p.dropout_scale : 0.0f;
        }
#endif
    }

    // O += P V: P from the accumulators (16 keys per k-step), V through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) {
      unsigned int a[FAP_ROW_TILES][4];
#pragma unroll
      for (int t = 0; t < FAP_ROW_TILES; ++t) {
        a[t][0] = pack2(s[t][2 * kk][0], s[t][2 * kk][1]);
        a[t][1] = pack2(s[t][2 * kk][2], s[t][2 * kk][3]);
        a[t][2] = pack2(s[t][2 * kk + 1][0], s[t][2 * kk + 1][1]);
        a[t][3] = pack2(s[t][2 * kk + 1][2], s[t][2 * kk + 1][3]);
      }
#pragma unroll
      for (int i = 0; i < FAP_HEAD_DIM / 16; ++i) {
        unsigned int b[4];
        ldmatrix_x4_trans(b, v_tile + (kk * 16 + (m % 2) * 8 + r) * FAP_STRIDE + i * 16 + (m / 2) * 8);
#pragma unroll
        for (int t = 0; t < FAP_ROW_TILES; ++t) {
          mma_16816(acc[t][2 * i], a[t], b[0], b[1]);
          mma_16816(acc[t][2 * i + 1], a[t], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait_all();

  // Finish: reduce the row sums over the quad, normalise, store out and lse.
#pragma unroll
  for (int t = 0; t < FAP_ROW_TILES; ++t)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_sum[t][half] += __shfl_xor_sync(0xffffffffu, row_sum[t][half], 1);
      row_sum[t][half] += __shfl_xor_sync(0xffffffffu, row_sum[t][half], 2);
      const int row = rows[t][half];
      if (row >= len_q) continue;
      const bool empty = row_sum[t][half] == 0.0f;
      const float inverse = empty ? 0.0f : 1.0f / row_sum[t][half];
      storage_t* out = static_cast<storage_t*>(p.out) + batch * p.out_batch_stride +
                       (q_start + row) * p.out_row_stride + head * p.out_head_stride;
#pragma unroll
      for (int i = 0; i < FAP_HEAD_DIM / 8; ++i) {
        const int col = i * 8 + quad * 2;
        if (col < p.head_dim) out[col] = from_float(acc[t][i][2 * half] * inverse);
        if (col + 1 < p.head_dim) out[col + 1] = from_float(acc[t][i][2 * half + 1] * inverse);
      }
      if (p.lse && quad == 0) {
        p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + (q_start + row) * p.lse_row_stride] =
            empty ? FAP_INFINITY : (row_max[t][half] + __log2f(row_sum[t][half])) * 0.6931471805599453f;
      }
    }
}

}  // namespace fap
