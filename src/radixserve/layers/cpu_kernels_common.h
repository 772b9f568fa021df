// What the CPU kernels' sources share (cpu_kernels.cpp, cpu_kernels_amx.cpp,
// cpu_kernels_avx512.cpp): cache-line prefetches, e^x in float32, bfloat16
// conversions, group sums of rows.
#pragma once

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

namespace radixserve_cpu {

// Every cache line of the `bytes` from p.
inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(c + at);
}

// e^x in float32 to about 2 ulp (Cephes' expf): x = n ln2 + r with ln2 split
// in two parts for precision, and a degree-6 polynomial for e^r.
namespace exp_coefficients {
constexpr float lowest = -87.0f, highest = 88.0f;
constexpr float log2e = 1.44269504088896341f;
constexpr float ln2_high = 0.693359375f, ln2_low = -2.12194440e-4f;
constexpr float p[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                        4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_coefficients

// Written so the compiler vectorizes it: libm's expf is a scalar call per
// element, and a decode step takes tens of thousands.
inline float fast_exp(float x) {
  namespace c = exp_coefficients;
  x = std::min(c::highest, std::max(c::lowest, x));
  // n = x / ln2 rounded to nearest: adding and taking away 1.5 * 2^23 rounds
  // a float to an integer in one vectorizable pair (floorf does not vectorize here).
  const float n = (x * c::log2e + 12582912.0f) - 12582912.0f;
  float r = x - n * c::ln2_high;
  r = r - n * c::ln2_low;
  float p = c::p[0];
  for (int i = 1; i < 6; ++i) p = p * r + c::p[i];
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

#ifdef __AVX512F__
// fast_exp on 16 lanes (2^n applied by scalef).
inline __m512 exp_ps(__m512 x) {
  namespace c = exp_coefficients;
  x = _mm512_min_ps(_mm512_set1_ps(c::highest), _mm512_max_ps(_mm512_set1_ps(c::lowest), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(c::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c::ln2_high), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(c::ln2_low), r);
  __m512 p = _mm512_set1_ps(c::p[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c::p[i]));
  return _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f)), n);
}

// 16 bfloat16 values as float32 (exact: a shift).
inline __m512 bf16x16_to_ps(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 to bfloat16 bits in the low half of each 32-bit lane, rounded to
// nearest even, NaN kept NaN: the scalar float_to_bf16 on 16 lanes. Integer
// arithmetic, not vcvtneps2bf16, which flushes subnormals where torch keeps them.
inline __m512i bf16_bits_ps(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i high = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(high, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
}

// x rounded to bfloat16 and widened back (an intermediate torch rounds).
inline __m512 round_to_bf16_ps(__m512 x) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits_ps(x), 16)); }

// x rounded to bfloat16, stored to p[0..16).
inline void store_bf16x16(uint16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits_ps(x)));
}

// sums_x [rows, k / group]: each row's sum of each group's inputs, in float32.
inline void group_sums(const uint16_t* x, int64_t x_stride, int64_t rows, int64_t k, int64_t group, float* sums_x) {
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < k / group; ++g) {
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = g * group; j < (g + 1) * group; j += 16)
        total = _mm512_add_ps(total, bf16x16_to_ps(x + m * x_stride + j));
      sums_x[m * (k / group) + g] = _mm512_reduce_add_ps(total);
    }
}
#endif

}  // namespace radixserve_cpu
