// Quantized weights times a few bfloat16 rows with AVX-512 BF16 dot products
// (vdpbf16ps), for CPUs without AMX (AMD Zen 4, Intel Cooper Lake): the
// linear layers and LM head of a decode step or a speculative verify there.
// Compiled with cpu_kernels.cpp into one library (cpu_kernels.py).
//
// torch's int4 and int8 kernels are bound by their arithmetic on such a CPU,
// not by memory (bench/cpu_quantized_linear_bench.py, 2-core EPYC that reads
// 50 GB/s; 3,072 x 576 int4 read from memory: 66 us at one row, 93 at four;
// the int8 LM head, 49,152 x 576: 1.6 ms at one row, 3.2 at four). Here a
// weight is widened once to bfloat16 and multiplied into up to four rows, two
// values of it per lane and instruction: 44 and 70-99 us; 0.8 and 1.4 ms. The
// kernels are bound by their instructions (the widening, the broadcast input
// pairs, the dot products), not by memory. For int8 weights the widening is
// most of them: int8_linear_vnni (below) multiplies bytes as stored, the rows
// in 16-bit fixed point, where the CPU has AVX-512 VNNI.
//
// The weights are in the AMX kernels' packed layouts (cpu_kernels_amx.cpp
// describes them): a B tile row, 32 bfloat16 = 16 columns x a pair of input
// values, is exactly vdpbf16ps's operand for 16 float32 sums.
//
// int4: a nibble q looked up as the bfloat16 q - 8 (vpermw over a 32-entry
// table), so a group's float32 sums are of x * (q - 8) and its scale and zero
// apply after, as in the AMX few-rows kernel: out = sum over groups of
// scale * sum(x * (q - 8)) + zero * sum(x), the weight's values unrounded.
// (The bfloat16 128 + q, a nibble ORed into 0x4300, saves nothing here and
// loses bits: its sums cancel 136 * sum(x) afterwards.)
// int8: q widened to float32 and narrowed to bfloat16 (exact for 8 bits),
// the row's scale applied to the finished sum.
//
// Each row is computed alone, in the same order whatever the number of rows
// beside it: a batch-1 decode and a verify give a row the same bits.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define RADIXSERVE_AVX512_BF16 1
#endif
#if defined(RADIXSERVE_AVX512_BF16) && defined(__AVX512VNNI__)  // (every CPU with BF16 has VNNI)
#define RADIXSERVE_AVX512_VNNI 1
#endif

namespace {

#ifdef RADIXSERVE_AVX512_BF16

using radixserve_cpu::bf16x16_to_ps;
using radixserve_cpu::group_sums;
using radixserve_cpu::prefetch_lines;
using radixserve_cpu::store_bf16x16;

constexpr int ROW_TILE = 4;  // rows multiplied together (registers: 2 x 2 x 4 sums)
// How far ahead a block's bytes are fetched into the caches, in blocks of 32
// columns: the weights stream from memory once a step.
constexpr int64_t PREFETCH_BLOCKS = 2;

// Input values k and k + 1 of a row, the pair a vdpbf16ps lane multiplies.
inline __m512bh pair_of(const uint16_t* row, int64_t k) {
  int32_t pair;
  memcpy(&pair, row + k, 4);
  return (__m512bh)_mm512_set1_epi32(pair);
}

// bfloat16(q - 8) for q = 0..15, twice (vpermw reads 5 bits of an index).
inline __m512i q_minus_8_table() {
  alignas(64) uint16_t values[32];
  for (int i = 0; i < 32; ++i) {
    const float value = static_cast<float>((i & 15) - 8);
    uint32_t bits;
    memcpy(&bits, &value, 4);
    values[i] = static_cast<uint16_t>(bits >> 16);  // small integers: the low half is zero
  }
  return _mm512_load_si512(values);
}

// 32 packed int4 bytes -> two B tile rows as bfloat16 q - 8: the low
// nibbles' row and the high nibbles' row.
inline void int4_bytes_as_bf16(const uint8_t* bytes, __m512i table, __m512bh& low, __m512bh& high) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  low = (__m512bh)_mm512_permutexvar_epi16(words, table);  // vpermw reads the low 5 bits: the low nibble, and bit 4
  high = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);  // a byte's top nibble
}

// 32 packed int8 values (a B tile row) as bfloat16.
inline __m512bh int8_row_as_bf16(const int8_t* q) {
  const __m512 first = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  const __m512 last =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
  return _mm512_cvtne2ps_pbh(last, first);
}

struct Int4Weight {
  const uint8_t* packed;  // the AMX int4 layout: 512 bytes per 32 x 32 block
  const uint16_t* scales_zeros;  // bfloat16 [k / group, n, 2]
  int64_t n, k, group;
};

struct Int8Weight {
  const int8_t* packed;  // the AMX int8 layout: 1,024 bytes per 32 x 32 block
  const float* scales;  // [n]
  int64_t n, k;
};

// Rows [m0, m0 + R) times H halves of 16 columns, n0 + 16 * first .. of an
// int4 weight's block of 32 columns. sums[row][half][nibble half]: two chains
// a half, so a row's additions follow the same order for any R and H. Both
// halves at once share each row's broadcast input pairs and give a single row
// four chains (the latency of vdpbf16ps); one half at a time keeps 3-4 rows'
// sums in registers (both at once spilled them: 4 rows took 2.2x one row's time).
template <int R, int H>
void int4_halves(const uint16_t* x, int64_t x_stride, const Int4Weight& w, const float* sums_x, int64_t n0,
                 int first, int64_t m0, uint16_t* out) {
  const uint8_t* block = w.packed + (n0 / 32) * (w.k / 32) * 512 + first * 256;
  const int64_t groups = w.k / w.group;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512i table = q_minus_8_table();
  __m512 total[R][H];
  for (int m = 0; m < R; ++m)
    for (int h = 0; h < H; ++h) total[m][h] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sums[R][H][2];
    for (int m = 0; m < R; ++m)
      for (int h = 0; h < H; ++h) sums[m][h][0] = sums[m][h][1] = _mm512_setzero_ps();
    for (int64_t k0 = g * w.group; k0 < (g + 1) * w.group; k0 += 32) {
      const uint8_t* tiles = block + (k0 / 32) * 512;
      prefetch_lines(tiles + PREFETCH_BLOCKS * (w.k / 32) * 512, 256 * H);
      for (int c = 0; c < 4; ++c)
        for (int r = 0; r < 2; ++r) {
          // bytes: tile rows 4c + r (low nibbles) and 4c + 2 + r (high), pairs k0 + 2 * row
          const int64_t k_low = k0 + 2 * (4 * c + r), k_high = k_low + 4;
          __m512bh x_low[R], x_high[R];
          for (int m = 0; m < R; ++m) {
            x_low[m] = pair_of(x + (m0 + m) * x_stride, k_low);
            x_high[m] = pair_of(x + (m0 + m) * x_stride, k_high);
          }
          for (int h = 0; h < H; ++h) {
            __m512bh low, high;
            int4_bytes_as_bf16(tiles + h * 256 + c * 64 + r * 32, table, low, high);
            for (int m = 0; m < R; ++m) {
              sums[m][h][0] = _mm512_dpbf16_ps(sums[m][h][0], low, x_low[m]);
              sums[m][h][1] = _mm512_dpbf16_ps(sums[m][h][1], high, x_high[m]);
            }
          }
        }
    }
    for (int h = 0; h < H; ++h) {
      // a 32-bit lane of scales_zeros is one column's (scale, zero)
      const __m512i pairs = _mm512_loadu_si512(w.scales_zeros + (g * w.n + n0 + 16 * (first + h)) * 2);
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
      for (int m = 0; m < R; ++m) {
        const __m512 sum_x = _mm512_set1_ps(sums_x[(m0 + m) * groups + g]);
        const __m512 dot = _mm512_add_ps(sums[m][h][0], sums[m][h][1]);  // sum(x * (q - 8))
        total[m][h] = _mm512_fmadd_ps(scale, dot, _mm512_fmadd_ps(zero, sum_x, total[m][h]));
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int h = 0; h < H; ++h) store_bf16x16(out + (m0 + m) * w.n + n0 + 16 * (first + h), total[m][h]);
}

// Rows [m0, m0 + R) times columns n0..n0 + 31 of an int4 weight.
template <int R>
void int4_block(const uint16_t* x, int64_t x_stride, const Int4Weight& w, const float* sums_x, int64_t n0,
                int64_t m0, uint16_t* out) {
  constexpr int H = R <= 2 ? 2 : 1;  // halves a pass
  for (int first = 0; first < 2; first += H) int4_halves<R, H>(x, x_stride, w, sums_x, n0, first, m0, out);
}

// The same for an int8 weight: each column's sum over all k, then its scale.
template <int R>
void int8_block(const uint16_t* x, int64_t x_stride, const Int8Weight& w, int64_t n0, int64_t m0, uint16_t* out) {
  const int8_t* block = w.packed + (n0 / 32) * (w.k / 32) * 1024;
  __m512 sums[R][2][2];
  for (int m = 0; m < R; ++m)
    for (int h = 0; h < 2; ++h) sums[m][h][0] = sums[m][h][1] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < w.k; k0 += 32) {
    const int8_t* tiles = block + (k0 / 32) * 1024;
    prefetch_lines(tiles + PREFETCH_BLOCKS * (w.k / 32) * 1024, 1024);
    for (int half = 0; half < 2; ++half)
      for (int r = 0; r < 16; ++r) {  // tile row r: the pair k0 + 2r, k0 + 2r + 1
        const __m512bh values = int8_row_as_bf16(tiles + half * 512 + r * 32);
        for (int m = 0; m < R; ++m)
          sums[m][half][r & 1] =
              _mm512_dpbf16_ps(sums[m][half][r & 1], values, pair_of(x + (m0 + m) * x_stride, k0 + 2 * r));
      }
  }
  for (int half = 0; half < 2; ++half) {
    const __m512 scale = _mm512_loadu_ps(w.scales + n0 + 16 * half);
    for (int m = 0; m < R; ++m)
      store_bf16x16(out + (m0 + m) * w.n + n0 + 16 * half,
                    _mm512_mul_ps(scale, _mm512_add_ps(sums[m][half][0], sums[m][half][1])));
  }
}

// Every row, ROW_TILE at a time, for each block of 32 columns; the column
// blocks split evenly over the threads (a block's bytes stay in cache across
// its row tiles). block(n0, m0, rows) multiplies one tile, its row count a
// std::integral_constant (a template instance, registers and all, per count).
template <typename Block>
void over_blocks(int64_t rows, int64_t n, Block block) {
#pragma omp parallel
  {
    const int64_t blocks = n / 32, threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = blocks * t / threads, last = blocks * (t + 1) / threads;
    for (int64_t b = first; b < last; ++b)
      for (int64_t m0 = 0; m0 < rows; m0 += ROW_TILE) {
        switch (std::min<int64_t>(ROW_TILE, rows - m0)) {
          case 1: block(b * 32, m0, std::integral_constant<int, 1>{}); break;
          case 2: block(b * 32, m0, std::integral_constant<int, 2>{}); break;
          case 3: block(b * 32, m0, std::integral_constant<int, 3>{}); break;
          default: block(b * 32, m0, std::integral_constant<int, ROW_TILE>{});
        }
      }
  }
}

#endif  // RADIXSERVE_AVX512_BF16

#ifdef RADIXSERVE_AVX512_VNNI

// ---- int8 weights times rows in 16-bit fixed point (vpdpbusd), for the LM head ----
//
// vdpbf16ps multiplies two values a lane and instruction, and an int8 weight
// must first be widened to bfloat16 (five instructions per 16 x 2 values): the
// int8 LM head at 4 rows took 2.4x its time at one row on a 2-core Zen 4.
// vpdpbusd multiplies four bytes a lane (unsigned x signed) and reads the
// weight as stored. The rows go to 16-bit fixed point by blocks of 32 values,
// x = 2^(e - 14) * v where the block's largest |x| is in [2^e, 2^(e + 1)): a
// bfloat16 value (8 significant bits) within 2^7 of that largest is exactly
// an integer v, and smaller ones lose only bits below 2^(e - 14). So the sums
// are those of the bfloat16 kernel (exact where it rounds in float32), not
// of 8-bit rows, whose error llama.cpp's Q8_0 activations accept. v is
// split in two bytes, v = 256 * high + low (high signed, low unsigned), and
// sum(q * v) = 256 * sum((q + 128) * high) - 256 * 128 * sum(high) + sum(low * q):
// the weight is stored as q + 128 (unsigned) for the first product and read
// as q (XOR 0x80, signed) for the second. Each block's sum is exact in int32.
// out = weight scale * sum over blocks of 2^(e - 14) * (the block's sum).
// Layout ("VNNI"): per 16 columns, k / 4 lines of 64 bytes, a line's 32-bit
// lane c holding column c's four consecutive weights (pack_int8_for_vnni).

struct FixedPointRows {
  int8_t* high;  // [rows, k]
  uint8_t* low;  // [rows, k]
  float* scales;  // [rows, k / 32]
  int32_t* high_sums;  // [rows, k / 32]: sum of each block's high bytes
  int64_t k;
};

// 2^e as a float, for -126 <= e <= 127.
inline float power_of_two(int e) {
  const uint32_t bits = static_cast<uint32_t>(e + 127) << 23;
  float value;
  memcpy(&value, &bits, 4);
  return value;
}

// Row m of x (bfloat16) in 16-bit fixed point by blocks of 32, into rows.
void fixed_point_row(const uint16_t* x, int64_t m, const FixedPointRows& rows) {
  const int64_t blocks = rows.k / 32;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512 lo = bf16x16_to_ps(x + b * 32), hi = bf16x16_to_ps(x + b * 32 + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    uint32_t bits;
    memcpy(&bits, &top, 4);
    const int exponent = static_cast<int>(bits >> 23) - 127;  // top in [2^e, 2^(e + 1))
    // (max drops a NaN operand, so NaNs are looked for apart)
    const bool nan = (_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q)) != 0;
    float to_fixed = 0.0f, scale = 0.0f;  // a block of zeros, or of values below 2^-112: zeros
    if (nan || exponent > 127) {
      scale = std::numeric_limits<float>::quiet_NaN();  // NaN or inf in: the row's outputs NaN
    } else if (exponent >= -112) {
      to_fixed = power_of_two(14 - exponent);  // |v| <= (2 - 2^-7) * 2^14 < 2^15
      scale = power_of_two(exponent - 14);
    }
    const __m512 by = _mm512_set1_ps(to_fixed);
    const __m512i v[2] = {_mm512_cvtps_epi32(_mm512_mul_ps(lo, by)), _mm512_cvtps_epi32(_mm512_mul_ps(hi, by))};
    __m512i high_sum = _mm512_setzero_si512();
    for (int half = 0; half < 2; ++half) {
      const __m512i high = _mm512_srai_epi32(v[half], 8);
      const int64_t at = m * rows.k + b * 32 + 16 * half;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(rows.high + at), _mm512_cvtepi32_epi8(high));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(rows.low + at),
                       _mm512_cvtepi32_epi8(_mm512_and_si512(v[half], _mm512_set1_epi32(0xFF))));
      high_sum = _mm512_add_epi32(high_sum, high);
    }
    rows.scales[m * blocks + b] = scale;
    rows.high_sums[m * blocks + b] = _mm512_reduce_add_epi32(high_sum);
  }
}

inline __m512i four_bytes(const void* p) {
  int32_t four;
  memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

// Rows [m0, m0 + R) times columns n0..n0 + 15 of a VNNI-packed weight.
template <int R>
void vnni_half(const FixedPointRows& x, const uint8_t* packed, const float* scales, int64_t n, int64_t n0,
               int64_t m0, uint16_t* out) {
  const int64_t k = x.k, blocks = k / 32;
  const uint8_t* lines = packed + (n0 / 16) * k * 16;
  const __m512i sign_bits = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i high[R], low[R];
    for (int m = 0; m < R; ++m) {
      high[m] = _mm512_set1_epi32(-128 * x.high_sums[(m0 + m) * blocks + b]);
      low[m] = _mm512_setzero_si512();
    }
    for (int j = 0; j < 8; ++j) {
      const __m512i shifted = _mm512_loadu_si512(lines + b * 512 + j * 64);  // q + 128
      const __m512i q = _mm512_xor_si512(shifted, sign_bits);
      for (int m = 0; m < R; ++m) {
        const int64_t at = (m0 + m) * k + b * 32 + j * 4;
        high[m] = _mm512_dpbusd_epi32(high[m], shifted, four_bytes(x.high + at));
        low[m] = _mm512_dpbusd_epi32(low[m], four_bytes(x.low + at), q);
      }
    }
    for (int m = 0; m < R; ++m) {
      const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(high[m], 8), low[m]);
      total[m] = _mm512_fmadd_ps(_mm512_set1_ps(x.scales[(m0 + m) * blocks + b]), _mm512_cvtepi32_ps(sum), total[m]);
    }
  }
  const __m512 scale = _mm512_loadu_ps(scales + n0);
  for (int m = 0; m < R; ++m) store_bf16x16(out + (m0 + m) * n + n0, _mm512_mul_ps(scale, total[m]));
}

#endif  // RADIXSERVE_AVX512_VNNI

}  // namespace

extern "C" {

int radixserve_avx512_bf16_available() {
#ifdef RADIXSERVE_AVX512_BF16
  return 1;
#else
  return 0;
#endif
}

// out [rows, n] bfloat16 (contiguous) = x [rows, k] bfloat16 (row stride
// x_stride) times an int4 weight in the AMX int4 layout with bfloat16
// scales_zeros [k / group, n, 2]. n, k and group multiples of 32. Returns 0,
// or -1 where the library was built without AVX-512 BF16.
int radixserve_int4_linear_avx512(const uint16_t* x, int64_t x_stride, const uint8_t* packed,
                                  const uint16_t* scales_zeros, uint16_t* out, int64_t rows, int64_t n, int64_t k,
                                  int64_t group) {
#ifdef RADIXSERVE_AVX512_BF16
  const Int4Weight w{packed, scales_zeros, n, k, group};
  std::vector<float> sums_x(rows * (k / group));
  group_sums(x, x_stride, rows, k, group, sums_x.data());
  over_blocks(rows, n, [&](int64_t n0, int64_t m0, auto r) {
    int4_block<decltype(r)::value>(x, x_stride, w, sums_x.data(), n0, m0, out);
  });
  return 0;
#else
  (void)x, (void)x_stride, (void)packed, (void)scales_zeros, (void)out, (void)rows, (void)n, (void)k, (void)group;
  return -1;
#endif
}

int radixserve_avx512_vnni_available() {
#ifdef RADIXSERVE_AVX512_VNNI
  return 1;
#else
  return 0;
#endif
}

// The same for an int8 weight in the AMX int8 layout with float32 scales [n].
int radixserve_int8_linear_avx512(const uint16_t* x, int64_t x_stride, const int8_t* packed, const float* scales,
                                  uint16_t* out, int64_t rows, int64_t n, int64_t k) {
#ifdef RADIXSERVE_AVX512_BF16
  const Int8Weight w{packed, scales, n, k};
  over_blocks(rows, n, [&](int64_t n0, int64_t m0, auto r) {
    int8_block<decltype(r)::value>(x, x_stride, w, n0, m0, out);
  });
  return 0;
#else
  (void)x, (void)x_stride, (void)packed, (void)scales, (void)out, (void)rows, (void)n, (void)k;
  return -1;
#endif
}

// out [rows, n] bfloat16 (contiguous) = x [rows, k] bfloat16 (row stride
// x_stride), in 16-bit fixed point by blocks of 32 values, times an int8 weight in
// the VNNI layout (its q + 128) with float32 scales [n]. n and k multiples of
// 32. Each row's result does not depend on the rows beside it. Returns 0, or
// -1 where the library was built without AVX-512 VNNI.
int radixserve_int8_linear_vnni(const uint16_t* x, int64_t x_stride, const uint8_t* packed, const float* scales,
                                uint16_t* out, int64_t rows, int64_t n, int64_t k) {
#ifdef RADIXSERVE_AVX512_VNNI
  std::vector<int8_t> high(rows * k);
  std::vector<uint8_t> low(rows * k);
  std::vector<float> block_scales(rows * (k / 32));
  std::vector<int32_t> high_sums(rows * (k / 32));
  const FixedPointRows fixed{high.data(), low.data(), block_scales.data(), high_sums.data(), k};
  for (int64_t m = 0; m < rows; ++m) fixed_point_row(x + m * x_stride, m, fixed);
  over_blocks(rows, n, [&](int64_t n0, int64_t m0, auto r) {
    for (int h = 0; h < 2; ++h) vnni_half<decltype(r)::value>(fixed, packed, scales, n, n0 + 16 * h, m0, out);
  });
  return 0;
#else
  (void)x, (void)x_stride, (void)packed, (void)scales, (void)out, (void)rows, (void)n, (void)k;
  return -1;
#endif
}

}  // extern "C"
