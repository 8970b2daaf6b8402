// The candidates for the CPU backend's tile products, on the shapes the attention uses (issue 17: measure the
// libraries made for small GEMMs before choosing one). One thread, GFLOP/s of each product, best of 5 runs of
// ~50 ms:
//   ours      the backend's fp32 micro-kernel (src/cpu/tile_gemm.cpp, Highway), B already in fp32 panels
//   libxsmm   libxsmm's kernels generated at run time for this machine, fp32 and bf16 inputs (B packed once in
//             its bf16 pair layout, as the backend stages it) with fp32 accumulation
// Shapes, for head dim d: the forward's S = Q K^T (64 x 256 x d) and O += P V (64 x d x 256), the backward's
// dP = dO V^T (64 x 256 x d), dV += P^T dO (256 x d x 64) and dQ += dS K (64 x d x 256).
// Build against the library's optimised build (the micro-kernel needs its flags), from the repository root:
//   g++ -O2 -std=c++17 -I. -Iinclude bench/cpu_tile_candidates.cpp build/libflash_attn_plus.a \
//       -lxsmm -lxsmmnoblas -lhwy -fopenmp -lpthread -ldl -o cpu_tile_candidates
// LIBXSMM_TARGET=hsw holds libxsmm to AVX2.
#include <libxsmm.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "src/cpu/tile_gemm.h"

namespace {

using Clock = std::chrono::steady_clock;

// Best GFLOP/s of `run` over 5 runs of about 50 ms each.
template <class Run>
double gflops(double flops, const Run& run) {
  int iterations = 1;
  for (;;) {
    const auto start = Clock::now();
    for (int i = 0; i < iterations; ++i) run();
    if (std::chrono::duration<double>(Clock::now() - start).count() > 0.05) break;
    iterations *= 2;
  }
  double best = 0.0;
  for (int trial = 0; trial < 5; ++trial) {
    const auto start = Clock::now();
    for (int i = 0; i < iterations; ++i) run();
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    best = std::max(best, flops * iterations / seconds * 1e-9);
  }
  return best;
}

uint16_t to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// C (M x N, fp32, row-major) += A (M x K, row-major) * B (K x N, row-major) through a libxsmm kernel. libxsmm
// is column-major, so it computes C^T = B^T A^T: its A is our B (N x K column-major), its B our A. bf16 inputs
// take libxsmm's VNNI layout for its A (pairs of K interleaved), packed once as the backend would stage B.
double xsmm_product(int64_t m, int64_t n, int64_t k, bool bf16) {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> a(m * k), b(k * n), c(m * n, 0.0f);
  for (float& x : a) x = normal(rng);
  for (float& x : b) x = normal(rng);
  const libxsmm_blasint lda = n, ldb = k, ldc = n;
  const float alpha = 1.0f, beta = 1.0f;
  if (!bf16) {
    const libxsmm_smmfunction kernel =
        libxsmm_smmdispatch(n, m, k, &lda, &ldb, &ldc, &alpha, &beta, nullptr, nullptr);
    if (!kernel) return 0.0;
    return gflops(2.0 * m * n * k, [&] { kernel(b.data(), a.data(), c.data()); });
  }
  std::vector<libxsmm_bfloat16> a16(m * k), b_vnni(k * n);
  for (int64_t i = 0; i < m * k; ++i) a16[i] = to_bf16(a[i]);
  for (int64_t kk = 0; kk < k; ++kk)
    for (int64_t j = 0; j < n; ++j) b_vnni[(kk / 2) * n * 2 + j * 2 + kk % 2] = to_bf16(b[kk * n + j]);
  const int flags = LIBXSMM_GEMM_FLAG_VNNI_A;
  const libxsmm_bsmmfunction kernel =
      libxsmm_bsmmdispatch(n, m, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, nullptr);
  if (!kernel) return 0.0;
  return gflops(2.0 * m * n * k, [&] { kernel(b_vnni.data(), a16.data(), c.data()); });
}

// The backend's micro-kernel: A strided fp32, B in panels of kPanel columns.
double our_product(int64_t m, int64_t n, int64_t k) {
  using fap::cpu::kPanel;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> a(m * k), b(fap::cpu::round_up_to_panel(n) * k), c(m * fap::cpu::round_up_to_panel(n));
  for (float& x : a) x = normal(rng);
  for (float& x : b) x = normal(rng);
  const int64_t ldc = fap::cpu::round_up_to_panel(n);
  return gflops(2.0 * m * n * k, [&] {
    fap::cpu::tile_gemm(m, n, k, {a.data(), k, 1}, {b.data(), kPanel * k}, c.data(), ldc, true);
  });
}

}  // namespace

int main() {
  std::printf("%-22s %5s %5s %5s %12s %12s %12s\n", "product", "M", "N", "K", "ours fp32", "libxsmm fp32",
              "libxsmm bf16");
  for (int64_t d : {64, 128}) {
    const struct {
      const char* name;
      int64_t m, n, k;
    } shapes[] = {{"S = Q K^T", 64, 256, d},   {"O += P V", 64, d, 256},   {"dP = dO V^T", 64, 256, d},
                  {"dV += P^T dO", 256, d, 64}, {"dQ += dS K", 64, d, 256}};
    for (const auto& s : shapes) {
      std::printf("%-22s %5lld %5lld %5lld %12.1f %12.1f %12.1f\n", s.name, static_cast<long long>(s.m),
                  static_cast<long long>(s.n), static_cast<long long>(s.k), our_product(s.m, s.n, s.k),
                  xsmm_product(s.m, s.n, s.k, false), xsmm_product(s.m, s.n, s.k, true));
    }
  }
  return 0;
}
