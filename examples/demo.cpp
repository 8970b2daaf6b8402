// The main job: random q, k, v through the best usable backend, checked against a float64 reference,
// printing which backend ran and how long it took.
//   fap_demo [batch seqlen heads head_dim]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "flash_attn_plus/flash_attn_plus.hpp"

namespace {

float bf16_to_float(uint16_t x) {
  const uint32_t bits = uint32_t{x} << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t batch = argc > 4 ? std::atoll(argv[1]) : 2, seqlen = argc > 4 ? std::atoll(argv[2]) : 1024;
  const int64_t heads = argc > 4 ? std::atoll(argv[3]) : 8, head_dim = argc > 4 ? std::atoll(argv[4]) : 64;
  const int64_t shape[] = {batch, seqlen, heads, head_dim};
  const size_t count = static_cast<size_t>(batch * seqlen * heads * head_dim);
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  std::vector<uint16_t> q(count), k(count), v(count), out(count, 0xffff);
  for (auto* t : {&q, &k, &v})
    for (auto& x : *t) x = float_to_bf16(normal(rng));

  fap_fwd_args args{};
  args.q = fap_make_tensor(q.data(), FAP_DTYPE_BFLOAT16, FAP_DEVICE_CPU, 0, 4, shape);
  args.k = fap_make_tensor(k.data(), FAP_DTYPE_BFLOAT16, FAP_DEVICE_CPU, 0, 4, shape);
  args.v = fap_make_tensor(v.data(), FAP_DTYPE_BFLOAT16, FAP_DEVICE_CPU, 0, 4, shape);
  args.out = fap_make_tensor(out.data(), FAP_DTYPE_BFLOAT16, FAP_DEVICE_CPU, 0, 4, shape);
  fap_options options = fap_default_options();
  options.causal = 1;

  try {
    for (const auto& backend : flash_attn_plus::backends())
      std::printf("backend %-6s %s%s\n", backend.name.c_str(), backend.usable ? "usable" : "unusable: ",
                  backend.reason.c_str());
    const std::string backend = flash_attn_plus::resolve_backend(FAP_DEVICE_CPU);
    flash_attn_plus::forward(args, options);  // warm-up: threads, pages
    const auto start = std::chrono::steady_clock::now();
    flash_attn_plus::forward(args, options);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double flops = 4.0 * static_cast<double>(batch * heads * seqlen * seqlen * head_dim) / 2;  // causal: half
    std::printf("causal bf16 attention b=%lld s=%lld h=%lld d=%lld on backend '%s': %.2f ms, %.1f GFLOP/s\n",
                static_cast<long long>(batch), static_cast<long long>(seqlen), static_cast<long long>(heads),
                static_cast<long long>(head_dim), backend.c_str(), seconds * 1e3, flops / seconds * 1e-9);

    // Check a sample of rows against float64 attention.
    double worst = 0.0;
    for (int sample = 0; sample < 32; ++sample) {
      const int64_t b = rng() % batch, h = rng() % heads, row = rng() % seqlen;
      std::vector<double> scores(static_cast<size_t>(row + 1));
      double max_score = -INFINITY;
      for (int64_t j = 0; j <= row; ++j) {
        double dot = 0.0;
        for (int64_t c = 0; c < head_dim; ++c)
          dot += double{bf16_to_float(q[((b * seqlen + row) * heads + h) * head_dim + c])} *
                 bf16_to_float(k[((b * seqlen + j) * heads + h) * head_dim + c]);
        scores[j] = dot / std::sqrt(static_cast<double>(head_dim));
        max_score = std::fmax(max_score, scores[j]);
      }
      double sum = 0.0;
      for (double& s : scores) sum += s = std::exp(s - max_score);
      for (int64_t c = 0; c < head_dim; ++c) {
        double expected = 0.0;
        for (int64_t j = 0; j <= row; ++j)
          expected += scores[j] / sum * bf16_to_float(v[((b * seqlen + j) * heads + h) * head_dim + c]);
        const double got = bf16_to_float(out[((b * seqlen + row) * heads + h) * head_dim + c]);
        worst = std::fmax(worst, std::fabs(got - expected));
      }
    }
    const bool ok = worst < 2e-2;
    std::printf("max |out - float64 reference| over 32 sampled rows: %.2e (%s)\n", worst, ok ? "ok" : "TOO LARGE");
    return ok ? 0 : 1;
  } catch (const flash_attn_plus::Error& error) {
    std::fprintf(stderr, "error: %s\n", error.what());
    return 1;
  }
}
