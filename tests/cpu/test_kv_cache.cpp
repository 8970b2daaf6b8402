// The C API's KV-cache call (flash_attn_with_kvcache) on the CPU backend, float32: every argument (dense cache
// entries picked by cache_batch_idx, left padding, paged caches of several page sizes, new keys appended with
// and without rotary in both layouts, GQA, several query rows, causal or not) against the float64 reference
// over the cache the call should leave; the cache outside the appended rows stays untouched. Bad arguments fail
// naming themselves and leave the cache as it was.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.h"
#include "tests/reference/reference_attention.h"

namespace fap::test {
namespace {

enum class Rotary { kNone, kInterleaved, kHalves };

struct KvCacheCase {
  bool append = false;
  Rotary rotary = Rotary::kNone;
  int64_t page = 0;  // 0: a dense cache
  bool leftpad = false, batch_idx = false, causal = false;
  int64_t heads_kv = 2, seqlen_q = 3;

  std::string describe() const {
    return "append=" + std::to_string(append) + " rotary=" + std::to_string(static_cast<int>(rotary)) +
           " page=" + std::to_string(page) + " leftpad=" + std::to_string(leftpad) +
           " batch_idx=" + std::to_string(batch_idx) + " causal=" + std::to_string(causal) +
           " heads_kv=" + std::to_string(heads_kv) + " seqlen_q=" + std::to_string(seqlen_q);
  }
};

void PrintTo(const KvCacheCase& c, std::ostream* stream) { *stream << c.describe(); }

constexpr int64_t kBatch = 3, kHeads = 4, kDim = 16, kCapacity = 24, kNew = 2, kRotaryHalf = 4;

// x turned by `angle` in the plane of dims (first, second): the textbook rotation, in float64.
void rotate_pair(std::vector<double>& row, int64_t first, int64_t second, double cos, double sin) {
  const double a = row[first], b = row[second];
  row[first] = a * cos - b * sin;
  row[second] = a * sin + b * cos;
}

// A head's row rotated at `position` with the tables (kRotaryHalf pairs), in float64.
std::vector<double> rotated(std::vector<double> row, Rotary rotary, const std::vector<float>& cos,
                            const std::vector<float>& sin, int64_t position) {
  for (int64_t i = 0; rotary != Rotary::kNone && i < kRotaryHalf; ++i) {
    const double c = cos[position * kRotaryHalf + i], s = sin[position * kRotaryHalf + i];
    if (rotary == Rotary::kInterleaved) {
      rotate_pair(row, 2 * i, 2 * i + 1, c, s);
    } else {
      rotate_pair(row, i, i + kRotaryHalf, c, s);
    }
  }
  return row;
}

struct KvCacheData {
  KvCacheCase config;
  int64_t entries = kBatch;                 // dense cache entries
  std::vector<float> q, k_cache, v_cache, k_new, v_new, cos, sin, out, lse;
  std::vector<int32_t> seqlens, batch_idx, leftpad, block_table;
  int64_t blocks_per_sequence = 0, num_blocks = 0;

  explicit KvCacheData(const KvCacheCase& c) : config(c) {
    std::mt19937 random(17);
    std::normal_distribution<float> normal;
    const auto fill = [&](std::vector<float>& values, size_t count) {
      values.resize(count);
      for (float& value : values) value = normal(random);
    };
    const int64_t row = c.heads_kv * kDim;
    entries = c.batch_idx ? kBatch + 2 : kBatch;
    fill(q, kBatch * c.seqlen_q * kHeads * kDim);
    if (c.page) {
      blocks_per_sequence = kCapacity / c.page;
      num_blocks = kBatch * blocks_per_sequence + 3;
      fill(k_cache, num_blocks * c.page * row);
      fill(v_cache, num_blocks * c.page * row);
      block_table.resize(kBatch * blocks_per_sequence);
      std::vector<int32_t> order(num_blocks);
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), random);
      std::copy_n(order.begin(), block_table.size(), block_table.begin());
    } else {
      fill(k_cache, entries * kCapacity * row);
      fill(v_cache, entries * kCapacity * row);
    }
    if (c.append) {
      fill(k_new, kBatch * kNew * row);
      fill(v_new, kBatch * kNew * row);
    }
    std::uniform_real_distribution<double> angle(0.0, 6.0);
    for (int64_t i = 0; i < kCapacity * kRotaryHalf; ++i) {
      const double a = angle(random);
      cos.push_back(static_cast<float>(std::cos(a)));
      sin.push_back(static_cast<float>(std::sin(a)));
    }
    const int32_t appended = c.append ? static_cast<int32_t>(kNew) : 0;
    seqlens = {5, 12, static_cast<int32_t>(kCapacity) - 2 - appended};
    batch_idx = {3, 0, 4};
    leftpad = {0, 7, 2};
    out.assign(q.size(), NAN);
    lse.assign(kBatch * kHeads * c.seqlen_q, NAN);
  }

  // The element offset of cache position `position` of sequence b, head h.
  int64_t cache_offset(int64_t b, int64_t position, int64_t h) const {
    const int64_t row = config.heads_kv * kDim;
    if (config.page) {
      const int64_t block = block_table[b * blocks_per_sequence + position / config.page];
      return (block * config.page + position % config.page) * row + h * kDim;
    }
    const int64_t entry = config.batch_idx ? batch_idx[b] : b;
    return (entry * kCapacity + position) * row + h * kDim;
  }

  fap_fwd_args args() {
    const KvCacheCase& c = config;
    fap_fwd_args a{};
    const int64_t q_shape[] = {kBatch, c.seqlen_q, kHeads, kDim};
    const int64_t batch_shape[] = {kBatch}, new_shape[] = {kBatch, kNew, c.heads_kv, kDim};
    const int64_t lse_shape[] = {kBatch, kHeads, c.seqlen_q}, rotary_shape[] = {kCapacity, kRotaryHalf};
    a.q = fap_make_tensor(q.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, q_shape);
    a.out = fap_make_tensor(out.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, q_shape);
    a.softmax_lse = fap_make_tensor(lse.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 3, lse_shape);
    if (c.page) {
      const int64_t cache_shape[] = {num_blocks, c.page, c.heads_kv, kDim};
      const int64_t table_shape[] = {kBatch, blocks_per_sequence};
      a.k = fap_make_tensor(k_cache.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, cache_shape);
      a.v = fap_make_tensor(v_cache.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, cache_shape);
      a.block_table = fap_make_tensor(block_table.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 2, table_shape);
    } else {
      const int64_t cache_shape[] = {entries, kCapacity, c.heads_kv, kDim};
      a.k = fap_make_tensor(k_cache.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, cache_shape);
      a.v = fap_make_tensor(v_cache.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, cache_shape);
    }
    a.cache_seqlens = fap_make_tensor(seqlens.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, batch_shape);
    if (c.batch_idx)
      a.cache_batch_idx = fap_make_tensor(batch_idx.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, batch_shape);
    if (c.leftpad) a.leftpad_k = fap_make_tensor(leftpad.data(), FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 1, batch_shape);
    if (c.append) {
      a.k_new = fap_make_tensor(k_new.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, new_shape);
      a.v_new = fap_make_tensor(v_new.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 4, new_shape);
    }
    if (c.rotary != Rotary::kNone) {
      a.rotary_cos = fap_make_tensor(cos.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 2, rotary_shape);
      a.rotary_sin = fap_make_tensor(sin.data(), FAP_DTYPE_FLOAT32, FAP_DEVICE_CPU, 0, 2, rotary_shape);
    }
    a.rotary_interleaved = c.rotary == Rotary::kInterleaved ? 1 : 0;
    a.num_splits = 3;  // changes nothing on the CPU; accepted
    return a;
  }

  fap_options options() const {
    fap_options o = fap_default_options();
    o.causal = config.causal ? 1 : 0;
    return o;
  }
};

fap_status run(const fap_fwd_args& args, const fap_options& options) {
  size_t bytes = 0;
  if (fap_status status = fap_mha_fwd_workspace_size(&args, &options, &bytes); status != FAP_SUCCESS) return status;
  std::vector<unsigned char> workspace(bytes + 16);
  return fap_mha_fwd(&args, &options, nullptr, workspace.data(), bytes);
}

std::vector<KvCacheCase> every_case() {
  std::vector<KvCacheCase> cases;
  for (int append = 0; append < 2; ++append)
    for (Rotary rotary : {Rotary::kNone, Rotary::kInterleaved, Rotary::kHalves})
      for (int64_t page : {0, 1, 4})
        for (int indices = 0; indices < 2; ++indices)
          for (int causal = 0; causal < 2; ++causal) {
            if (rotary != Rotary::kNone && !append) continue;  // a rotary embedding needs keys to append
            if (page && indices) continue;                     // no entries or left padding with pages
            KvCacheCase c;
            c.append = append, c.rotary = rotary, c.page = page, c.causal = causal;
            c.leftpad = c.batch_idx = indices;
            c.heads_kv = causal ? 1 : 2;
            c.seqlen_q = append ? 3 : 1;
            cases.push_back(c);
          }
  return cases;
}

class KvCache : public ::testing::TestWithParam<KvCacheCase> {};

TEST_P(KvCache, MatchesTheReferenceOverTheAppendedCache) {
  const KvCacheCase& c = GetParam();
  KvCacheData data(c);
  const std::vector<float> k_before = data.k_cache, v_before = data.v_cache;
  ASSERT_EQ(run(data.args(), data.options()), FAP_SUCCESS) << fap_last_error();

  // The cache as the call should leave it, and the reference problem over each sequence's used keys.
  ReferenceProblem problem;
  problem.batch = kBatch, problem.heads_q = kHeads, problem.heads_kv = c.heads_kv, problem.head_dim = kDim;
  problem.scale = 1.0 / std::sqrt(static_cast<double>(kDim));
  problem.causal = c.causal;
  problem.max_seqlen_k = kCapacity;
  std::vector<double> q, k, v;
  const int64_t appended = c.append ? kNew : 0;
  std::vector<bool> written(data.k_cache.size(), false);
  for (int64_t b = 0; b < kBatch; ++b) {
    const int64_t used = data.seqlens[b] + appended, start = c.leftpad ? data.leftpad[b] : 0;
    for (int64_t t = 0; t < appended; ++t)
      for (int64_t h = 0; h < c.heads_kv; ++h) {
        const int64_t source = ((b * kNew + t) * c.heads_kv + h) * kDim, target = data.cache_offset(b, data.seqlens[b] + t, h);
        const std::vector<double> key(data.k_new.begin() + source, data.k_new.begin() + source + kDim);
        const std::vector<double> want = rotated(key, c.rotary, data.cos, data.sin, data.seqlens[b] + t);
        for (int64_t d = 0; d < kDim; ++d) {
          EXPECT_NEAR(data.k_cache[target + d], want[d], 1e-5) << "appended key " << b << "," << t << " " << c.describe();
          EXPECT_EQ(data.v_cache[target + d], data.v_new[source + d]) << "appended value " << c.describe();
          written[target + d] = true;
        }
      }
    problem.q_start.push_back(problem.total_q), problem.len_q.push_back(c.seqlen_q);
    problem.k_start.push_back(problem.total_k), problem.len_k.push_back(used - start);
    problem.total_q += c.seqlen_q, problem.total_k += used - start;
    for (int64_t i = 0; i < c.seqlen_q; ++i)
      for (int64_t h = 0; h < kHeads; ++h) {
        const auto first = data.q.begin() + ((b * c.seqlen_q + i) * kHeads + h) * kDim;
        const int64_t position = data.seqlens[b] + (c.causal ? i : 0);  // FA2: by row only with a mask
        for (double x : rotated(std::vector<double>(first, first + kDim), c.rotary, data.cos, data.sin, position)) {
          q.push_back(c.rotary == Rotary::kNone ? x : static_cast<float>(x));  // the call rounds q once, to float
        }
      }
    for (int64_t t = start; t < used; ++t)
      for (int64_t h = 0; h < c.heads_kv; ++h)
        for (int64_t d = 0; d < kDim; ++d) {
          k.push_back(data.k_cache[data.cache_offset(b, t, h) + d]);  // checked above where appended
          v.push_back(data.v_cache[data.cache_offset(b, t, h) + d]);
        }
  }
  for (size_t i = 0; i < written.size(); ++i) {
    if (written[i]) continue;
    ASSERT_EQ(data.k_cache[i], k_before[i]) << "k_cache element " << i << " changed: " << c.describe();
    ASSERT_EQ(data.v_cache[i], v_before[i]) << "v_cache element " << i << " changed: " << c.describe();
  }
  const ReferenceForward want = reference_forward(problem, q, k, v);
  for (int64_t b = 0; b < kBatch; ++b)
    for (int64_t i = 0; i < c.seqlen_q; ++i)
      for (int64_t h = 0; h < kHeads; ++h) {
        const int64_t row = b * c.seqlen_q + i;
        for (int64_t d = 0; d < kDim; ++d)
          ASSERT_NEAR(data.out[(row * kHeads + h) * kDim + d], want.out[(row * kHeads + h) * kDim + d], 2e-5)
              << c.describe();
        ASSERT_NEAR(data.lse[(b * kHeads + h) * c.seqlen_q + i], want.lse[h * problem.total_q + row], 2e-5)
            << c.describe();
      }
}

std::string case_name(const ::testing::TestParamInfo<KvCacheCase>& param_info) {
  const KvCacheCase& c = param_info.param;
  const char* rotary[] = {"none", "interleaved", "halves"};
  return std::string(c.append ? "append" : "noappend") + "_" + rotary[static_cast<int>(c.rotary)] + "_page" +
         std::to_string(c.page) + (c.leftpad ? "_indexed" : "") + (c.causal ? "_causal" : "");
}

INSTANTIATE_TEST_SUITE_P(EveryArgument, KvCache, ::testing::ValuesIn(every_case()), case_name);

TEST(KvCacheArguments, BadArgumentsAreNamedAndLeaveTheCacheUntouched) {
  KvCacheCase base;
  base.append = true, base.rotary = Rotary::kInterleaved, base.leftpad = base.batch_idx = true;
  const struct {
    const char* name;
    void (*breaks)(KvCacheData&, fap_fwd_args&, fap_options&);
    const char* message;
  } cases[] = {
      {"count past the cache", [](KvCacheData& d, fap_fwd_args&, fap_options&) { d.seqlens[2] = kCapacity - 1; },
       "cache_seqlens[2] = 23: expected a key count in [0, 22]"},
      {"negative count", [](KvCacheData& d, fap_fwd_args&, fap_options&) { d.seqlens[0] = -1; },
       "cache_seqlens[0] = -1"},
      {"count dtype", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.cache_seqlens.dtype = FAP_DTYPE_FLOAT32; },
       "cache_seqlens: expected dtype int32"},
      {"count shape", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.cache_seqlens.shape[0] = 2; },
       "cache_seqlens: expected shape (batch)"},
      {"entry out of range", [](KvCacheData& d, fap_fwd_args&, fap_options&) { d.batch_idx[1] = 5; },
       "cache_batch_idx[1] = 5: expected an entry of the cache in [0, 5)"},
      {"left padding past the keys", [](KvCacheData& d, fap_fwd_args&, fap_options&) { d.leftpad[0] = 8; },
       "leftpad_k[0] = 8: expected a value in [0, 7]"},
      {"new keys shape", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.k_new.shape[2] = 1; },
       "k_new: expected shape"},
      {"new keys without values", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.v_new = fap_tensor{}; },
       "v_new: k_new and v_new come together"},
      {"rotary without new keys",
       [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.k_new = a.v_new = fap_tensor{}; },
       "rotary_cos: a rotary embedding needs k_new and v_new"},
      {"rotary table too short", [](KvCacheData&, fap_fwd_args& a, fap_options&) {
         a.rotary_cos.shape[0] = a.rotary_sin.shape[0] = kCapacity - 1;
       }, "rotary_cos: expected at least as many rows as the cache's 24 positions, got 23"},
      {"rotary wider than the head", [](KvCacheData&, fap_fwd_args& a, fap_options&) {
         a.rotary_cos.shape[1] = a.rotary_sin.shape[1] = kDim;
       }, "rotary_cos: rotary_dim = 2 * 16 must be in [2, head_dim = 16]"},
      {"only cos", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.rotary_sin = fap_tensor{}; },
       "rotary_sin: rotary_cos and rotary_sin come together"},
      {"rotary layout flag", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.rotary_interleaved = 2; },
       "rotary_interleaved: expected 0 or 1, got 2"},
      {"negative splits", [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.num_splits = -1; },
       "num_splits: expected >= 0"},
      {"dropout", [](KvCacheData&, fap_fwd_args&, fap_options& o) { o.dropout_p = 0.1f; },
       "dropout_p: a KV-cache call has no dropout"},
      {"pages with entries", [](KvCacheData& d, fap_fwd_args& a, fap_options&) {
         static int32_t table[kBatch] = {0, 1, 2};
         const int64_t shape[] = {kBatch, 1};
         a.block_table = fap_make_tensor(table, FAP_DTYPE_INT32, FAP_DEVICE_CPU, 0, 2, shape);
         (void)d;
       }, "cache_batch_idx: not with a paged KV cache"},
      {"cache arguments without cache_seqlens",
       [](KvCacheData&, fap_fwd_args& a, fap_options&) { a.cache_seqlens = fap_tensor{}; },
       "cache_batch_idx: only KV-cache calls (with cache_seqlens) take it"},
  };
  for (const auto& test : cases) {
    KvCacheData data(base);
    fap_fwd_args args = data.args();
    fap_options options = data.options();
    test.breaks(data, args, options);
    const std::vector<float> k_before = data.k_cache, v_before = data.v_cache;
    EXPECT_EQ(run(args, options), FAP_ERROR_INVALID_ARGUMENT) << test.name;
    EXPECT_NE(std::string(fap_last_error()).find(test.message), std::string::npos)
        << test.name << ": " << fap_last_error();
    EXPECT_EQ(data.k_cache, k_before) << test.name;
    EXPECT_EQ(data.v_cache, v_before) << test.name;
  }
}

}  // namespace
}  // namespace fap::test
