// FlashAttention-2's mask rule, shared by every backend and the reference (it includes nothing but
// host_device.h, so that NVRTC compiles it too).
//
// Query row i and key column j count from the start of one sequence of lengths len_q, len_k; the diagonal
// is aligned to the bottom-right corner: offset = len_k - len_q. With a window (left, right), both already
// normalised by normalize_window() so that either both are >= 0 or both are -1 (no window),
//   key j is allowed  iff  i + offset - left <= j <= i + offset + right  and  0 <= j < len_k.
// Causal attention is the window (left, 0).
#pragma once

#include "core/host_device.h"

namespace fap {

struct KeyRange {
  long long begin, end;  // allowed keys are [begin, end); empty when begin >= end
};

struct AttentionWindow {
  long long left = -1, right = -1;  // both -1: full attention
  FAP_HOST_DEVICE bool active() const { return left >= 0; }
};

// FlashAttention-2's normalisation (flash_api.cpp): causal forces right = 0; a side at least max_seqlen_k
// long is unbounded; a one-sided window gets the other side replaced by max_seqlen_k.
FAP_HOST_DEVICE AttentionWindow normalize_window(long long left, long long right, bool causal,
                                                 long long max_seqlen_k) {
  if (causal) right = 0;
  if (left >= max_seqlen_k) left = -1;
  if (right >= max_seqlen_k) right = -1;
  if (left < 0 && right >= 0) left = max_seqlen_k;
  if (left >= 0 && right < 0) right = max_seqlen_k;
  if (left < 0) left = right = -1;
  AttentionWindow window;
  window.left = left;
  window.right = right;
  return window;
}

FAP_HOST_DEVICE KeyRange allowed_keys(const AttentionWindow& window, long long row, long long len_q,
                                      long long len_k) {
  KeyRange range{0, len_k};
  if (window.active()) {
    const long long diagonal = row + len_k - len_q;
    const long long begin = diagonal - window.left;
    const long long end = diagonal + window.right + 1;
    if (begin > range.begin) range.begin = begin;
    if (end < range.end) range.end = end;
  }
  return range;
}

// The rules for one key, given the key on the row's diagonal (row + len_k - len_q), in the caller's integer
// type (the CUDA kernels keep positions in int): the window test of allowed_keys (a normalised, active window),
// and the ALiBi bias -slope * |diagonal - key|.
template <typename Int>
FAP_HOST_DEVICE bool window_allows(Int key, Int diagonal, Int left, Int right) {
  return key >= diagonal - left && key <= diagonal + right;
}

template <typename Int>
FAP_HOST_DEVICE float alibi_bias_at(float slope, Int diagonal, Int key) {
  Int distance = diagonal - key;
  if (distance < 0) distance = -distance;
  return -slope * static_cast<float>(distance);
}

// ALiBi bias for query row i and key j: -slope * |i + len_k - len_q - j|.
FAP_HOST_DEVICE float alibi_bias(float slope, long long row, long long column, long long len_q, long long len_k) {
  return alibi_bias_at(slope, row + len_k - len_q, column);
}

}  // namespace fap
