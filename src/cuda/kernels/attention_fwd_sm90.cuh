// Attention forward for Hopper (sm_90a): FlashAttention-2's algorithm on warpgroup MMAs, with the loads
// and the two kinds of work split between warpgroups (FlashAttention-3's warp specialisation). One CTA per work
// item of (block of FAP_BLOCK_M query rows, batch, head), or one per SM taking items in turn (FAP_PERSISTENT), one
// warpgroup more than FAP_BLOCK_M / 64:
// - the producer (warpgroup 0) copies each item's Q and K, V tiles of FAP_BLOCK_N keys with cp.async into a
//   ring of FAP_STAGES stages in shared memory, handing each tile over through an mbarrier ("full") and waiting for
//   the consumers to hand the stage back ("empty");
// - the consumers (two, or three at FAP_BLOCK_M = 192) own 64 query rows each: S = Q K^T with both operands in
//   shared memory, the online softmax in registers, O += P V with P from registers. They take turns at the tensor
//   cores in a ring (named barriers), so that one's softmax runs while another's products do ("ping-pong").
// Tiles are in the 128-byte-swizzled layout wgmma reads (hopper.cuh). The producer gives most of its
// registers to the consumers (setmaxnreg).
//
// Compile-time configuration: FAP_HEAD_DIM (a multiple of 64), FAP_BLOCK_M (128 or 192), FAP_BLOCK_N,
// FAP_WARPS (4 + FAP_BLOCK_M / 16), FAP_STAGES,
// FAP_BF16, FAP_SOFTCAP, FAP_ALIBI, FAP_DROPOUT, FAP_WINDOW, FAP_PERSISTENT.
#pragma once

#include "hopper.cuh"
#include "attention_fwd_common.cuh"
#include "tile_layouts.h"


namespace fap {

#define FAP_CONSUMERS (FAP_BLOCK_M / 64)
#define FAP_CONSUMER_THREADS (FAP_CONSUMERS * 128)
static_assert(FAP_WARPS == 4 + 4 * FAP_CONSUMERS, "a producer warpgroup and a consumer per 64 rows");
// The register file split between the roles (setmaxnreg): the producer's share goes to the consumers, within
// the 64 K registers the launch holds for the CTA (its FAP_WARPS * 32 threads at 65536 / threads each).
#define FAP_PRODUCER_REGISTERS (FAP_CONSUMERS == 2 ? 40 : 32)
#define FAP_CONSUMER_REGISTERS (FAP_CONSUMERS == 2 ? 232 : 160)
static_assert(128 * FAP_PRODUCER_REGISTERS + FAP_CONSUMER_THREADS * FAP_CONSUMER_REGISTERS <= 65536,
              "the roles' registers fit the register file");

// The producer's copy of `count` rows x head_dim of a (row, dim) operand into a swizzled tile of ROWS x
// FAP_HEAD_DIM, zero-filling the rest, then its arrival on `full`. Whole tiles by copy_whole_tile; otherwise, with
// vector_loads (every row starts 16-byte aligned and head_dim % 8 == 0) each producer thread copies one 16-byte
// column chunk of every kRowsPerPass-th row with cp.async, checked, and arrives when its copies land; else element
// copies and a plain arrival, which releases them. This address arithmetic is the producer's whole cost: keep it lean.
template <int ROWS>
__device__ __forceinline__ void produce_tile(unsigned char* tile, unsigned int full, const storage_t* source,
                                             long long row_stride, int count, int head_dim, int vector_loads) {
  constexpr int kChunksPerRow = FAP_HEAD_DIM / 8, kRowsPerPass = 128 / kChunksPerRow;
  const int col = threadIdx.x % kChunksPerRow * 8, first_row = threadIdx.x / kChunksPerRow;
  if (copy_whole_tile<ROWS, 128>(tile, source, row_stride, count, head_dim, vector_loads)) {
    mbarrier_arrive_after_copies(full);
    return;
  }
  if (vector_loads) {
    if (first_row < kRowsPerPass) {  // 128 % kChunksPerRow threads idle at d = 192
      const storage_t* from = source + first_row * row_stride + col;
      const long long step = kRowsPerPass * row_stride;
#pragma unroll 4
      for (int row = first_row; row < ROWS; row += kRowsPerPass, from += step) {
        const bool inside = row < count && col < head_dim;
        cp_async_16_or_zero(tile + swizzled_offset<ROWS>(row, col), inside ? from : source, inside);
      }
    }
    mbarrier_arrive_after_copies(full);
    return;
  }
  for (int chunk = threadIdx.x; chunk < ROWS * kChunksPerRow; chunk += 128) {
    const int row = chunk / kChunksPerRow, col8 = chunk % kChunksPerRow * 8;
    store_chunk_of_elements(tile + swizzled_offset<ROWS>(row, col8), source + row * row_stride + col8,
                            row < count ? head_dim - col8 : 0);
  }
  mbarrier_arrive(full);
}

// The shared-memory ring: the Q tile, FAP_STAGES stages of K and V tiles, and their mbarriers.
constexpr HopperForwardSharedLayout kForwardLayout{FAP_BLOCK_M, FAP_BLOCK_N, FAP_HEAD_DIM, FAP_STAGES};
static_assert(kForwardLayout.barriers_fit(), "the pipeline's mbarriers fit their slot");

struct ForwardShared {
  enum : int { kKvBytes = kForwardLayout.kv_tile_bytes() };
  unsigned char* q;
  unsigned char* k;  // stage s at k + s * kKvBytes
  unsigned char* v;
  unsigned int barriers;  // shared address of: q_full, q_empty, then k_full, k_empty, v_full, v_empty per stage

  __device__ unsigned int q_full() const { return barriers; }
  __device__ unsigned int q_empty() const { return barriers + 8; }
  __device__ unsigned int k_full(int stage) const { return barriers + 8 * (2 + stage); }
  __device__ unsigned int k_empty(int stage) const { return barriers + 8 * (2 + FAP_STAGES + stage); }
  __device__ unsigned int v_full(int stage) const { return barriers + 8 * (2 + 2 * FAP_STAGES + stage); }
  __device__ unsigned int v_empty(int stage) const { return barriers + 8 * (2 + 3 * FAP_STAGES + stage); }
};

// Tile `index` (counted over every key tile the CTA has taken, across its work items) sits in stage
// index % FAP_STAGES, in the stage's (index / FAP_STAGES)-th use: the parity its "full" phase completes with.
__device__ __forceinline__ int stage_of(int index) { return index % FAP_STAGES; }
__device__ __forceinline__ unsigned int parity_of(int index) { return (unsigned int)(index / FAP_STAGES) & 1u; }

// With FAP_PERSISTENT, a grid of at most one CTA per SM whose CTAs take the work items in turn, so that the
// producer loads the next item's Q and first K/V tiles while the consumers finish the current one (its last
// products, the output's normalisation and stores); the host chooses it for short calls (with_forward_schedule),
// where those phases would otherwise leave the SM idle. Otherwise one CTA per item, in place_in_grid's grid
// (row blocks, batch, heads; under a window batch first), and the loop below runs once: the compiler sees that and keeps none of its state (with dropout there
// is no register to spare for it). Long calls stay on the hardware's scheduling of CTAs: the fixed schedule below
// measured slower there (-35 % at 16k causal; likely because its CTAs drift apart and read many heads' K and V at
// once, where the hardware keeps the running CTAs on few heads, in L2: not profiled).
constexpr bool kPersistent = FAP_PERSISTENT;
static_assert(!(FAP_PERSISTENT && FAP_DROPOUT), "the persistent loop's state does not fit beside dropout's");

// A work item: one block of FAP_BLOCK_M query rows of one (batch, head), with its key tiles. The persistent
// schedule numbers them row blocks (last first, so that under a causal mask the blocks with the most keys start
// first) of one (batch, head) after the other; the grid of one CTA per item places them by place_in_grid.
struct WorkItem {
  int batch, head, row_begin;
  ForwardSequence seq;
  BlockRange tiles;  // empty: nothing to load (past the sequence's rows, or no key in reach)
};
__device__ __forceinline__ WorkItem work_item(const AttentionFwdParams& p, int item, int row_blocks) {
  WorkItem w;
  if (kPersistent) {
    const int pair = item / row_blocks;
    w.batch = pair % p.batch, w.head = pair / p.batch;
    w.row_begin = (row_blocks - 1 - item % row_blocks) * FAP_BLOCK_M;
  } else {
    const GridPlace place = forward_place_in_grid();
    w.batch = place.batch, w.head = place.head;
    w.row_begin = (row_blocks - 1 - place.rank) * FAP_BLOCK_M;
  }
  w.seq = sequence_info<long long>(p, w.batch);
  w.tiles = w.row_begin < w.seq.len_q ? BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::key_blocks(p, w.seq, w.row_begin)
                                      : BlockRange{0, 0};
  return w;
}

// The CTA's work item in round `round` of the schedule (past the last: `items`). The persistent rounds take
// gridDim.x items each, dealt to the CTAs in alternating directions, so that under a causal mask a CTA's long item
// of one round pairs with a shorter one of the next (dealt in one direction, CTA c took every gridDim.x-th item:
// items of nearly the same length for most grids).
__device__ __forceinline__ int scheduled_item(int round, int items) {
  if (!kPersistent) return round == 0 ? (int)blockIdx.x : items;
  const int first = round * gridDim.x;
  return first + (round % 2 == 0 ? blockIdx.x : gridDim.x - 1 - blockIdx.x);
}

extern "C" __global__ void __launch_bounds__(FAP_WARPS * 32, 1) attention_fwd(const AttentionFwdParams p) {
  extern __shared__ __align__(1024) unsigned char shared_raw[];
  ForwardShared shared;
  shared.q = swizzle_aligned(shared_raw);
  shared.k = shared.q + kForwardLayout.k_tiles();
  shared.v = shared.q + kForwardLayout.v_tiles();
  shared.barriers = shared_address(shared.q + kForwardLayout.barriers());

  if (threadIdx.x == 0) {
    mbarrier_init(shared.q_full(), 128);
    mbarrier_init(shared.q_empty(), FAP_CONSUMER_THREADS);
    for (int stage = 0; stage < FAP_STAGES; ++stage) {
      mbarrier_init(shared.k_full(stage), 128);
      mbarrier_init(shared.v_full(stage), 128);
      mbarrier_init(shared.k_empty(stage), FAP_CONSUMER_THREADS);
      mbarrier_init(shared.v_empty(stage), FAP_CONSUMER_THREADS);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  // Broadcast from lane 0 so that the compiler knows the role is uniform in each warp (else it treats the
  // roles' code as divergent and serialises the wgmmas).
  const int warpgroup = __shfl_sync(0xffffffffu, (int)threadIdx.x / 128, 0);
  if (warpgroup == 0) {
    lower_registers<FAP_PRODUCER_REGISTERS>();
    // Each role counts the Q tiles and the key tiles it has passed, for the barriers' phases. (Values live across
    // the register reallocation would be spilled: each role computes its own after it.)
    const int row_blocks = (p.seqlen_q + FAP_BLOCK_M - 1) / FAP_BLOCK_M, items = row_blocks * p.batch * p.heads_q;
    int q_loads = 0, tiles_before = 0;
    for (int round = 0, item = scheduled_item(0, items); item < items; item = scheduled_item(++round, items)) {
      const WorkItem w = work_item(p, item, row_blocks);
      const int tile_count = w.tiles.end - w.tiles.first;
      if (tile_count <= 0) continue;
      const int kv_head = w.head / p.group_size;
      const storage_t* q = static_cast<const storage_t*>(p.q) + w.batch * p.q_batch_stride + (w.seq.q_start + w.row_begin) * p.q_row_stride + w.head * p.q_head_stride;
      const storage_t* k = static_cast<const storage_t*>(p.k) + w.batch * p.k_batch_stride + w.seq.k_start * p.k_row_stride + kv_head * p.k_head_stride;
      const storage_t* v = static_cast<const storage_t*>(p.v) + w.batch * p.v_batch_stride + w.seq.k_start * p.v_row_stride + kv_head * p.v_head_stride;
      // The consumers' last scores of the previous item have read the Q tile.
      if (kPersistent) mbarrier_wait(shared.q_empty(), (unsigned int)(q_loads & 1) ^ 1u);
      produce_tile<FAP_BLOCK_M>(shared.q, shared.q_full(), q, p.q_row_stride, w.seq.len_q - w.row_begin, p.head_dim,
                                p.vector_loads);
      ++q_loads;
      for (int index = tiles_before; index < tiles_before + tile_count; ++index) {
        const int stage = stage_of(index), key0 = (w.tiles.first + index - tiles_before) * FAP_BLOCK_N;
        mbarrier_wait(shared.k_empty(stage), parity_of(index) ^ 1u);
        produce_tile<FAP_BLOCK_N>(shared.k + stage * ForwardShared::kKvBytes, shared.k_full(stage),
                                  k + key0 * p.k_row_stride, p.k_row_stride, w.seq.len_k - key0, p.head_dim, p.vector_loads);
        mbarrier_wait(shared.v_empty(stage), parity_of(index) ^ 1u);
        produce_tile<FAP_BLOCK_N>(shared.v + stage * ForwardShared::kKvBytes, shared.v_full(stage),
                                  v + key0 * p.v_row_stride, p.v_row_stride, w.seq.len_k - key0, p.head_dim, p.vector_loads);
      }
      tiles_before += tile_count;
    }
    return;
  }

  raise_registers<FAP_CONSUMER_REGISTERS>();
  const int row_blocks = (p.seqlen_q + FAP_BLOCK_M - 1) / FAP_BLOCK_M, items = row_blocks * p.batch * p.heads_q;
  int q_loads = 0, tiles_before = 0;
  const int consumer = warpgroup - 1, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32;
  const unsigned int q_address = shared_address(shared.q), k_address = shared_address(shared.k),
                     v_address = shared_address(shared.v);
  // Each consumer issues its products in turns with the others, passing the turn to the next in the ring: round r
  // (r = 0 .. tile_count) of an item is O += P_{r-1} V_{r-1} and S_r = Q K_r^T. Barrier 1 + c is consumer c's turn;
  // two warpgroups meet at it, c waiting and the one before it arriving.
  const auto take_turn = [&] { named_barrier_sync(1 + consumer, 256); };
  const auto pass_turn = [&] { named_barrier_arrive(1 + (consumer + 1) % FAP_CONSUMERS, 256); };
  // Data first, then the turn: a consumer never holds the tensor cores while it waits for a tile.
  const auto wait_for = [&](unsigned int full, int index) {
    mbarrier_wait(full, parity_of(index));
    fence_proxy_async();
  };

  for (int round = 0, item = scheduled_item(0, items); item < items; item = scheduled_item(++round, items)) {
    const WorkItem w = work_item(p, item, row_blocks);
    if (w.row_begin >= w.seq.len_q) continue;
    const int tile_count = w.tiles.end - w.tiles.first, batch = w.batch, head = w.head, row_begin = w.row_begin;
    const ForwardSequence& seq = w.seq;
    const int rows[2] = {row_begin + consumer * 64 + warp * 16 + lane / 4, row_begin + consumer * 64 + warp * 16 + lane / 4 + 8};
    float acc[FAP_HEAD_DIM / 8][4];
    zero_fragments(acc);
    float row_max[2] = {-FAP_INFINITY, -FAP_INFINITY}, row_sum[2] = {0.0f, 0.0f};

    if (tile_count > 0) {
      const float slope = FAP_ALIBI ? p.alibi[batch * p.alibi_batch_stride + head] : 0.0f;
      float s[FAP_BLOCK_N / 8][4];
      unsigned int probabilities[FAP_BLOCK_N / 16][4];  // P of the latest tile: the A operand of its P V
      const int last = tiles_before + tile_count - 1;     // the item's last tile, counted over the CTA's

      const auto issue_scores = [&](int index) {
        wgmma_fence();
        const unsigned int k_tile = k_address + stage_of(index) * ForwardShared::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < FAP_HEAD_DIM / 16; ++kk) {
          wgmma_ss<FAP_BLOCK_N>(&s[0][0], k_major_descriptor<FAP_BLOCK_M>(q_address, consumer * 64, kk),
                                k_major_descriptor<FAP_BLOCK_N>(k_tile, 0, kk), kk > 0);
        }
      };
      const auto issue_product = [&](int index) {
        wgmma_fence();
        const unsigned int v_tile = v_address + stage_of(index) * ForwardShared::kKvBytes;
#pragma unroll
        for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk)
          wgmma_rs<FAP_HEAD_DIM>(&acc[0][0], probabilities[kk], mn_major_descriptor<FAP_BLOCK_N>(v_tile, kk), 1);
      };
      // Softmax of S_index: probabilities in s, the correction the output needs before its next product.
      const auto softmax = [&](int index, float (&correction)[2]) {
        const int key0 = (w.tiles.first + index - tiles_before) * FAP_BLOCK_N;
        softmax_tile(s, p, seq, batch, head, rows, key0,
                     BlockInfo<FAP_BLOCK_M, FAP_BLOCK_N>::needs_mask(p, seq, row_begin, key0), slope, row_max, row_sum,
                     correction);
      };
      const auto keep_probabilities = [&] {
#pragma unroll
        for (int kk = 0; kk < FAP_BLOCK_N / 16; ++kk) pack_a_operand(probabilities[kk], s, kk);
      };
      // After the wait for S_index (its product may still run): K_index, and after the item's last scores the
      // Q tile, go back to the producer.
      const auto scores_done = [&](int index) {
        fence_registers<FAP_BLOCK_N / 2>(&s[0][0]);
        mbarrier_arrive(shared.k_empty(stage_of(index)));
        if (kPersistent && index == last) mbarrier_arrive(shared.q_empty());
      };

      mbarrier_wait(shared.q_full(), (unsigned int)(q_loads & 1));
      if (consumer == FAP_CONSUMERS - 1) pass_turn();  // consumer 0 goes first
      wait_for(shared.k_full(stage_of(tiles_before)), tiles_before);
      take_turn();
      issue_scores(tiles_before);
      wgmma_commit();
      pass_turn();
      wgmma_wait<0>();
      scores_done(tiles_before);
      {
        float correction[2];
        softmax(tiles_before, correction);  // the output is still zero: nothing to correct
        keep_probabilities();
      }
      // Round index: S_index = Q K_index^T and O += P_{index-1} V_{index-1} issued in that order, then the
      // softmax of S_index while the product still runs (FlashAttention-3's intra-warpgroup overlap, on top of
      // the consumers' ping-pong); P_index replaces P_{index-1}, the product's operand, only after it completes.
      for (int index = tiles_before + 1; index <= last; ++index) {
        wait_for(shared.k_full(stage_of(index)), index);
        wait_for(shared.v_full(stage_of(index - 1)), index - 1);
        take_turn();
        issue_scores(index);
        wgmma_commit();
        issue_product(index - 1);
        wgmma_commit();
        pass_turn();
        wgmma_wait<1>();
        scores_done(index);
        float correction[2];
        softmax(index, correction);
        wgmma_wait<0>();
        fence_registers<FAP_HEAD_DIM / 2>(&acc[0][0]);
        mbarrier_arrive(shared.v_empty(stage_of(index - 1)));
        rescale_rows(acc, correction);
        keep_probabilities();
      }
      wait_for(shared.v_full(stage_of(last)), last);
      take_turn();
      issue_product(last);
      wgmma_commit();
      if (consumer != FAP_CONSUMERS - 1) pass_turn();  // the next consumers' last turns of the item
      wgmma_wait<0>();
      fence_registers<FAP_HEAD_DIM / 2>(&acc[0][0]);
      if (kPersistent) mbarrier_arrive(shared.v_empty(stage_of(last)));
      ++q_loads;
      tiles_before += tile_count;
    }

    store_rows(p, seq, batch, head, rows, acc, row_sum, row_max);
  }
}

}  // namespace fap
