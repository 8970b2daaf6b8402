// FlashAttention-2's rotary embedding of one row element, shared by the CPU backend and the CUDA kernels:
// dims [0, rotary_dim) turn in pairs by the angle of their pair index at the row's position, in fp32 on the
// stored values (rounded once by the caller); dims past rotary_dim are copied.
#pragma once

#include "core/host_device.h"

namespace fap {

// Where dim `dim` of a row finds its pair: the partner dim, the pair's index into the (position, half_dim)
// cos/sin tables, and whether it is the pair's first element. Interleaved: pairs (2i, 2i + 1); else (i, i + half).
struct RotaryPair {
  int partner, angle;
  bool first;
};

FAP_HOST_DEVICE RotaryPair rotary_pair(int dim, int half_dim, bool interleaved) {
  if (interleaved) return {dim ^ 1, dim / 2, (dim & 1) == 0};
  return dim < half_dim ? RotaryPair{dim + half_dim, dim, true} : RotaryPair{dim - half_dim, dim - half_dim, false};
}

// (x, partner) turned by the angle with this cos and sin: x cos - partner sin for a pair's first element,
// x cos + partner sin for its second. Written as two products and a sum, as PyTorch evaluates it.
FAP_HOST_DEVICE float rotate_element(float x, float partner, float cos, float sin, bool first) {
  const float along = x * cos, across = partner * sin;
  return first ? along - across : along + across;
}

}  // namespace fap
