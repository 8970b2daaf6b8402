// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the dropout
// mask every backend draws from it. It includes nothing but host_device.h, so that the CPU backend, the
// tests and the run-time compiled CUDA kernels share this one definition and draw bit-identical masks.
//
// The mask contract (docs/c-api.md): element (batch b, head h, row i, column j) of a problem with H query
// heads, where i and j count from the start of b's sequence, is kept iff word (j % 4) of
//   philox4x32_10(counter = {j / 4, i, b * H + h, lo32(offset)}, key = {lo32(seed), hi32(seed) ^ hi32(offset)})
// is >= dropout_threshold(p). Kept probabilities are scaled by 1 / (1 - p).
#pragma once

#include "core/host_device.h"

namespace fap {

struct Philox4 {
  unsigned int x, y, z, w;
};

FAP_HOST_DEVICE void philox_mul_hi_lo(unsigned int a, unsigned int b, unsigned int* hi, unsigned int* lo) {
  const unsigned long long product = static_cast<unsigned long long>(a) * b;
  *hi = static_cast<unsigned int>(product >> 32);
  *lo = static_cast<unsigned int>(product);
}

FAP_HOST_DEVICE Philox4 philox4x32_10(Philox4 counter, unsigned int key0, unsigned int key1) {
  const unsigned int kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  const unsigned int kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    unsigned int hi0, lo0, hi1, lo1;
    philox_mul_hi_lo(kMul0, counter.x, &hi0, &lo0);
    philox_mul_hi_lo(kMul1, counter.z, &hi1, &lo1);
    counter = Philox4{hi1 ^ counter.y ^ key0, lo1, hi0 ^ counter.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// Random words >= this are kept. p is in [0, 1).
FAP_HOST_DEVICE unsigned int dropout_threshold(float p) {
  const double scaled = static_cast<double>(p) * 4294967296.0;
  return scaled >= 4294967295.0 ? 4294967295u : static_cast<unsigned int>(scaled);
}

// The four random words covering columns 4*column_group .. 4*column_group + 3 of one row.
FAP_HOST_DEVICE Philox4 dropout_words(unsigned long long seed, unsigned long long offset,
                                      unsigned int batch_head, unsigned int row, unsigned int column_group) {
  const Philox4 counter{column_group, row, batch_head, static_cast<unsigned int>(offset)};
  return philox4x32_10(counter, static_cast<unsigned int>(seed),
                       static_cast<unsigned int>(seed >> 32) ^ static_cast<unsigned int>(offset >> 32));
}

FAP_HOST_DEVICE unsigned int philox_word(const Philox4& words, unsigned int index) {
  return index == 0 ? words.x : index == 1 ? words.y : index == 2 ? words.z : words.w;
}

}  // namespace fap
