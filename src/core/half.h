// Scalar float16 / bfloat16 <-> float32 conversions with round-to-nearest-even, bit-exact with IEEE 754 and
// with torch's conversions. Used where values cross between a tensor's storage type and fp32 arithmetic.
#pragma once

#include <cstdint>
#include <cstring>

#include "flash_attn_plus/flash_attn_plus.h"

namespace fap {

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float bfloat16_to_float(uint16_t value) { return bits_float(uint32_t{value} << 16); }

inline uint16_t float_to_bfloat16(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

inline float float16_to_float(uint16_t value) {
  const uint32_t sign = uint32_t{value & 0x8000u} << 16;
  const uint32_t exponent = (value >> 10) & 0x1fu;
  const uint32_t mantissa = value & 0x3ffu;
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Subnormal (or zero): mantissa * 2^-24, exact in float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

inline uint16_t float_to_float16(float value) {
  const uint32_t bits = float_bits(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;          // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;         // rounds to infinity (>= 65520)
  if (magnitude >= 0x38800000u) {                              // normal half
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
  }
  if (magnitude < 0x33000000u) return sign;                     // below half the smallest subnormal
  // Subnormal half: shift the full mantissa into place with round-to-nearest-even.
  const uint32_t exponent = magnitude >> 23;
  const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126 - exponent;  // 14..24
  const uint32_t halfway = 1u << (shift - 1);
  const uint32_t remainder = mantissa & ((1u << shift) - 1);
  uint32_t result = mantissa >> shift;
  if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
  return sign | static_cast<uint16_t>(result);
}

inline float load_as_float(fap_dtype dtype, const void* base, int64_t index) {
  switch (dtype) {
    case FAP_DTYPE_FLOAT16: return float16_to_float(static_cast<const uint16_t*>(base)[index]);
    case FAP_DTYPE_BFLOAT16: return bfloat16_to_float(static_cast<const uint16_t*>(base)[index]);
    default: return static_cast<const float*>(base)[index];
  }
}

inline void store_from_float(fap_dtype dtype, void* base, int64_t index, float value) {
  switch (dtype) {
    case FAP_DTYPE_FLOAT16: static_cast<uint16_t*>(base)[index] = float_to_float16(value); break;
    case FAP_DTYPE_BFLOAT16: static_cast<uint16_t*>(base)[index] = float_to_bfloat16(value); break;
    default: static_cast<float*>(base)[index] = value; break;
  }
}

// Rounds a float to the precision of dtype (what a store and reload would give).
inline float round_to(fap_dtype dtype, float value) {
  switch (dtype) {
    case FAP_DTYPE_FLOAT16: return float16_to_float(float_to_float16(value));
    case FAP_DTYPE_BFLOAT16: return bfloat16_to_float(float_to_bfloat16(value));
    default: return value;
  }
}

}  // namespace fap
