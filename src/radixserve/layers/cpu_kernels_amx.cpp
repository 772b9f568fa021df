// Quantized weights times bfloat16 rows on AMX: the decode step's linear
// layers (and LM head) on a CPU with AMX. Compiled with cpu_kernels.cpp into
// one library (cpu_kernels.py). Each 32 x 32 block of the weight is
// dequantized in registers to the bfloat16 values the dense copy holds and
// multiplied on the tile unit, so a step reads the quantized weight (4 or 8
// bits a value) rather than the dense copy's 16, and does the dense copy's
// arithmetic (float32 sums of bfloat16 products). An int4 weight times at
// most 8 rows takes another way (amx_int4_few_rows, below).
//
// Packed weights (cpu_kernels.py packs them): per block of 32 output columns
// and 32 input values, two B tiles (columns 0..15, 16..31). A B tile holds 16
// rows of 32 bfloat16, row r = the pairs (k = 2r, 2r + 1) of its 16 columns
// (AMX's pairs layout). In an int8 weight a tile is those 512 values in that
// order; in an int4 weight it is 256 bytes, four 64-byte chunks, chunk c's
// low nibbles rows 4c and 4c + 1 (32 bytes each), its high nibbles rows
// 4c + 2 and 4c + 3.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

#include "cpu_kernels_common.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define RADIXSERVE_AMX 1
#endif

namespace {

#ifdef RADIXSERVE_AMX

using radixserve_cpu::group_sums;
using radixserve_cpu::prefetch_lines;

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands AMX's tile state to a process only on request.
bool amx_permitted() {
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  static const bool permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return permitted;
}

// Tiles: 0, 1 the rows (A) 0..15 and 16..31; 2, 3 the weight's B tiles; 4..7
// the sums, C[m block][column tile] = 4 + m + 2 * t.
void configure_tiles(int64_t rows) {
  TileConfig cfg;
  const int64_t a_rows[2] = {std::min<int64_t>(16, rows), std::max<int64_t>(0, rows - 16)};
  for (int m = 0; m < 2; ++m) {
    if (a_rows[m] == 0) continue;
    cfg.rows[m] = cfg.rows[4 + m] = cfg.rows[6 + m] = static_cast<uint8_t>(a_rows[m]);
    cfg.colsb[m] = cfg.colsb[4 + m] = cfg.colsb[6 + m] = 64;
  }
  cfg.rows[2] = cfg.rows[3] = 16;
  cfg.colsb[2] = cfg.colsb[3] = 64;
  // ldtilecfg by hand: GCC 12's _tile_loadconfig does not tell the compiler it
  // reads the config, which then dropped the stores of its rows and columns
  // as dead (an invalid config: SIGSEGV here, SIGILL at the first tile use).
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// Lane j of a B tile row's first (half 0) or last 16 values is column 8 * half + j / 2.

// Of 16 columns' bfloat16 (scale, zero) pairs, the scales (odd = 0) or zeros
// (odd = 1) as float32 in that lane order.
inline __m512 pair_lanes_bf16(__m512i scales_zeros, int half, int odd) {
  alignas(64) uint16_t idx[32];
  for (int j = 0; j < 16; ++j) idx[2 * j] = 0, idx[2 * j + 1] = static_cast<uint16_t>(2 * (8 * half + j / 2) + odd);
  const __m512i picked = _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_load_si512(idx), scales_zeros);
  return _mm512_castsi512_ps(picked);  // a bfloat16 in a float32's high half is that float32
}

// Of 16 columns' float32 scales, those in that lane order.
inline __m512 pair_lanes_f32(__m512 scales, int half) {
  alignas(64) int32_t idx[16];
  for (int j = 0; j < 16; ++j) idx[j] = 8 * half + j / 2;
  return _mm512_permutexvar_ps(_mm512_load_si512(idx), scales);
}

// Two float32 halves of a B tile row rounded into it (32 bfloat16).
inline void store_tile_row(uint16_t* row, __m512 first, __m512 last) {
  _mm512_storeu_si512(row, (__m512i)_mm512_cvtne2ps_pbh(last, first));
}

// A 64-byte chunk c of an int4 B tile: its low nibbles (tile rows 4c, 4c + 1)
// and its high nibbles (rows 4c + 2, 4c + 3), a byte each.
inline void split_nibbles(const uint8_t* chunk, __m512i nibbles[2]) {
  const __m512i bytes = _mm512_loadu_si512(chunk), low_nibbles = _mm512_set1_epi8(0x0F);
  nibbles[0] = _mm512_and_si512(bytes, low_nibbles);
  nibbles[1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low_nibbles);
}

// int4 in groups of input values (torch's int4 CPU format): scales and zeros
// bfloat16 [k / group, n, 2], w = (q - 8) * scale + zero.
struct Int4Groups {
  const uint8_t* packed;
  const uint16_t* scales_zeros;
  int64_t n, k, group;

  // Into the caches: the 32 x 32 block at (n0, k0), and its scales and zeros.
  void prefetch(int64_t n0, int64_t k0) const {
    prefetch_lines(packed + (n0 / 32) * (k / 32) * 512 + (k0 / 32) * 512, 512);
    if (k0 % group == 0) prefetch_lines(scales_zeros + ((k0 / group) * n + n0) * 2, 128);
  }

  // The 256 packed bytes of the B tile of columns n0..n0 + 15 at input values k0..k0 + 31.
  const uint8_t* tile_bytes(int64_t n0, int64_t k0) const {
    return packed + (n0 / 32) * (k / 32) * 512 + (k0 / 32) * 512 + (n0 % 32 / 16) * 256;
  }

  // That B tile's values into `tile`.
  void dequantize(int64_t n0, int64_t k0, uint16_t* tile) const {
    const uint8_t* bytes_at = tile_bytes(n0, k0);
    const __m512i sz = _mm512_loadu_si512(scales_zeros + ((k0 / group) * n + n0) * 2);
    __m512 scale[2], shift[2];
    for (int half = 0; half < 2; ++half) {
      scale[half] = pair_lanes_bf16(sz, half, 0);
      // (q - 8) * scale + zero = q * scale + (zero - 8 * scale), as int4_dequantized computes it
      shift[half] = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale[half], pair_lanes_bf16(sz, half, 1));
    }
    for (int c = 0; c < 4; ++c) {
      __m512i nibbles[2];
      split_nibbles(bytes_at + 64 * c, nibbles);
      for (int hi = 0; hi < 2; ++hi) {
        for (int r = 0; r < 2; ++r) {
          __m512 w[2];
          for (int half = 0; half < 2; ++half) {
            const __m128i q = _mm512_extracti32x4_epi32(nibbles[hi], 2 * r + half);
            w[half] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), scale[half], shift[half]);
          }
          store_tile_row(tile + (4 * c + 2 * hi + r) * 32, w[0], w[1]);
        }
      }
    }
  }
};

// int8 with a float32 scale per output column (int8wo): w = q * scale.
struct Int8Rows {
  const int8_t* packed;
  const float* scales;
  int64_t n, k;

  void prefetch(int64_t n0, int64_t k0) const {
    prefetch_lines(packed + (n0 / 32) * (k / 32) * 1024 + (k0 / 32) * 1024, 1024);
    if (k0 == 0) prefetch_lines(scales + n0, 128);
  }

  void dequantize(int64_t n0, int64_t k0, uint16_t* tile) const {
    const int8_t* q = packed + (n0 / 32) * (k / 32) * 1024 + (k0 / 32) * 1024 + (n0 % 32 / 16) * 512;
    const __m512 column_scales = _mm512_loadu_ps(scales + n0);
    const __m512 scale[2] = {pair_lanes_f32(column_scales, 0), pair_lanes_f32(column_scales, 1)};
    for (int r = 0; r < 16; ++r) {
      __m512 w[2];
      for (int half = 0; half < 2; ++half) {
        const __m128i values = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * 32 + 16 * half));
        w[half] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(values)), scale[half]);
      }
      store_tile_row(tile + r * 32, w[0], w[1]);
    }
  }
};

// Rows (at most 32) of x times the weight's columns n0..n0 + 31, rounded to
// bfloat16 into out (row stride n); tiles configured for these rows
// (configure_tiles). Each 32 x 32 block is dequantized into b_tiles just
// before its products: dequantizing a whole column strip first and then
// multiplying was 1.6x slower (the strip left L1).
// next_n0: the column block this thread takes next (-1: none), whose weight
// is prefetched a block of input values at a time: the weight streams from
// memory while this block computes (without, a step's cold weights took
// 1.6x the time of warm ones).
template <typename Weight>
void amx_block(const uint16_t* x, int64_t x_stride, const Weight& weight, uint16_t* out, int64_t rows, int64_t n0,
               int64_t next_n0, uint16_t* b_tiles, float* sums) {
  _tile_zero(4);
  _tile_zero(6);
  if (rows > 16) {
    _tile_zero(5);
    _tile_zero(7);
  }
  for (int64_t k0 = 0; k0 < weight.k; k0 += 32) {
    if (next_n0 >= 0) weight.prefetch(next_n0, k0);
    weight.dequantize(n0, k0, b_tiles);
    weight.dequantize(n0 + 16, k0, b_tiles + 512);
    _tile_loadd(2, b_tiles, 64);
    _tile_loadd(3, b_tiles + 512, 64);
    _tile_loadd(0, x + k0, x_stride * 2);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(6, 0, 3);
    if (rows > 16) {
      _tile_loadd(1, x + 16 * x_stride + k0, x_stride * 2);
      _tile_dpbf16ps(5, 1, 2);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  // sums [32 rows][32 columns] float32, then rounded into out
  _tile_stored(4, sums, 128);
  _tile_stored(6, sums + 16, 128);
  if (rows > 16) {
    _tile_stored(5, sums + 16 * 32, 128);
    _tile_stored(7, sums + 16 * 32 + 16, 128);
  }
  for (int64_t m = 0; m < rows; ++m)
    store_tile_row(out + m * weight.n + n0, _mm512_loadu_ps(sums + m * 32), _mm512_loadu_ps(sums + m * 32 + 16));
}

// out [rows, n] = x [rows, k] (row stride x_stride) times the weight, column
// blocks of 32 shared among the threads.
template <typename Weight>
void amx_linear(const uint16_t* x, int64_t x_stride, const Weight& weight, uint16_t* out, int64_t rows) {
#pragma omp parallel
  {
    alignas(64) uint16_t b_tiles[2 * 512];
    alignas(64) float sums[32 * 32];
    int64_t configured_rows = -1;
    // each thread a run of column blocks, so that it knows its next
    const int64_t blocks = weight.n / 32, threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t first = blocks * t / threads, last = blocks * (t + 1) / threads;
    for (int64_t blk = first; blk < last; ++blk) {
      // more than 32 rows dequantize each block again for each 32 (decode batches rarely have more)
      for (int64_t m0 = 0; m0 < rows; m0 += 32) {
        const int64_t block_rows = std::min<int64_t>(32, rows - m0);
        const int64_t next_n0 = m0 + 32 >= rows && blk + 1 < last ? (blk + 1) * 32 : -1;
        if (block_rows != configured_rows) configure_tiles(configured_rows = block_rows);
        amx_block(x + m0 * x_stride, x_stride, weight, out + m0 * weight.n, block_rows, blk * 32, next_n0, b_tiles,
                  sums);
      }
    }
    if (configured_rows >= 0) _tile_release();
  }
}


// A few rows times an int4 weight, multiplied in the weight's own integers:
// the B tiles hold q - 8 (exact in bfloat16), the tile unit sums x * (q - 8)
// over one group of input values, and the group's scale and zero apply to
// those sums in float32: out = sum over groups of
// scale * sum(x * (q - 8)) + zero * sum(x). A weight then costs a byte
// widening, a table lookup and a store instead of the dense copy's
// conversion, multiply-add and rounding: half the instructions, while the
// scaling, once a group for each row and column, stays small for a few rows
// (3,072 x 576, weights not in cache, 2-core AMX Xeon: 44 us at one row and
// 54 at eight, against 82 and 84 for amx_linear and 51 and 182 for torch's
// int4 kernel; from about 12 rows amx_linear is faster).
// The weight's values are (q - 8) * scale + zero unrounded (the dense copy
// rounds them to bfloat16). Each row is computed alone, in the same order for
// any number of rows: a row's bits do not depend on the others.

constexpr int64_t INT4_FEW_ROWS = 8;

// q -> bfloat16(q - 8) for q in 0..15 (a 32-entry table: vpermw reads 5 bits),
// made once.
inline __m512i q_minus_8_table() {
  struct Table {
    alignas(64) uint16_t values[32];
    Table() {
      for (int i = 0; i < 32; ++i) {
        const float value = static_cast<float>((i & 15) - 8);
        uint32_t bits;
        memcpy(&bits, &value, 4);
        values[i] = static_cast<uint16_t>(bits >> 16);  // small integers: the low half is zero
      }
    }
  };
  static const Table table;
  return _mm512_load_si512(table.values);
}

// The B tile of columns n0..n0 + 15 at input values k0..k0 + 31 as q - 8.
inline void int4_q_tile(const Int4Groups& w, int64_t n0, int64_t k0, __m512i table, uint16_t* tile) {
  const uint8_t* bytes_at = w.tile_bytes(n0, k0);
  for (int c = 0; c < 4; ++c) {
    __m512i nibbles[2];
    split_nibbles(bytes_at + 64 * c, nibbles);
    for (int hi = 0; hi < 2; ++hi) {
      const __m512i rows[2] = {_mm512_cvtepu8_epi16(_mm512_castsi512_si256(nibbles[hi])),
                               _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(nibbles[hi], 1))};
      for (int r = 0; r < 2; ++r)
        _mm512_storeu_si512(tile + (4 * c + 2 * hi + r) * 32, _mm512_permutexvar_epi16(rows[r], table));
    }
  }
}

// One thread's column blocks [first, last) for ROWS rows; acc in registers.
template <int ROWS>
void int4_few_rows_blocks(const uint16_t* x, int64_t x_stride, const Int4Groups& w, uint16_t* out,
                          const float* sums_x, int64_t first, int64_t last, __m512i table, uint16_t* b_tiles,
                          float* sums) {
  const int64_t groups = w.k / w.group;
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t blk = first; blk < last; ++blk) {
    const int64_t n0 = blk * 32;
    __m512 acc[ROWS][2];
    for (int m = 0; m < ROWS; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    _tile_zero(4);
    _tile_zero(6);
    for (int64_t k0 = 0; k0 < w.k; k0 += 32) {
      if (blk + 1 < last) w.prefetch(n0 + 32, k0);
      int4_q_tile(w, n0, k0, table, b_tiles);
      int4_q_tile(w, n0 + 16, k0, table, b_tiles + 512);
      _tile_loadd(2, b_tiles, 64);
      _tile_loadd(3, b_tiles + 512, 64);
      _tile_loadd(0, x + k0, x_stride * 2);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(6, 0, 3);
      if ((k0 + 32) % w.group != 0) continue;
      // the group's sums, scaled: a 32-bit lane of scales_zeros is a column's (scale, zero)
      _tile_stored(4, sums, 128);
      _tile_stored(6, sums + 16, 128);
      _tile_zero(4);
      _tile_zero(6);
      const int64_t g = k0 / w.group;
      for (int half = 0; half < 2; ++half) {
        const __m512i pairs = _mm512_loadu_si512(w.scales_zeros + (g * w.n + n0 + 16 * half) * 2);
        const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
        const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
        for (int m = 0; m < ROWS; ++m) {
          const __m512 with_zero = _mm512_fmadd_ps(zero, _mm512_set1_ps(sums_x[m * groups + g]), acc[m][half]);
          acc[m][half] = _mm512_fmadd_ps(scale, _mm512_load_ps(sums + m * 32 + 16 * half), with_zero);
        }
      }
    }
    for (int m = 0; m < ROWS; ++m) store_tile_row(out + m * w.n + n0, acc[m][0], acc[m][1]);
  }
}

template <int ROWS>
void amx_int4_few_rows(const uint16_t* x, int64_t x_stride, const Int4Groups& w, uint16_t* out) {
  float sums_x[ROWS * 256];  // k / group <= 256 (int4_takes_few_rows)
  group_sums(x, x_stride, ROWS, w.k, w.group, sums_x);
  const __m512i table = q_minus_8_table();
#pragma omp parallel
  {
    alignas(64) uint16_t b_tiles[2 * 512];
    alignas(64) float sums[ROWS * 32];
    TileConfig cfg;
    cfg.rows[0] = cfg.rows[4] = cfg.rows[6] = ROWS;
    cfg.colsb[0] = cfg.colsb[4] = cfg.colsb[6] = 64;
    cfg.rows[2] = cfg.rows[3] = 16;
    cfg.colsb[2] = cfg.colsb[3] = 64;
    asm volatile("ldtilecfg %0" : : "m"(cfg));
    const int64_t blocks = w.n / 32, threads = omp_get_num_threads(), t = omp_get_thread_num();
    int4_few_rows_blocks<ROWS>(x, x_stride, w, out, sums_x, blocks * t / threads, blocks * (t + 1) / threads, table,
                               b_tiles, sums);
    _tile_release();
  }
}

// Whether amx_int4_few_rows takes these rows.
bool int4_takes_few_rows(int64_t rows, int64_t k, int64_t group) {
  return rows >= 1 && rows <= INT4_FEW_ROWS && k / group <= 256;
}

void int4_few_rows(const uint16_t* x, int64_t x_stride, const Int4Groups& w, uint16_t* out, int64_t rows) {
  switch (rows) {
    case 1: return amx_int4_few_rows<1>(x, x_stride, w, out);
    case 2: return amx_int4_few_rows<2>(x, x_stride, w, out);
    case 3: return amx_int4_few_rows<3>(x, x_stride, w, out);
    case 4: return amx_int4_few_rows<4>(x, x_stride, w, out);
    case 5: return amx_int4_few_rows<5>(x, x_stride, w, out);
    case 6: return amx_int4_few_rows<6>(x, x_stride, w, out);
    case 7: return amx_int4_few_rows<7>(x, x_stride, w, out);
    default: return amx_int4_few_rows<8>(x, x_stride, w, out);
  }
}

#endif  // RADIXSERVE_AMX

}  // namespace

// Decode attention's scores on the tile unit (cpu_kernels.cpp's bfloat16
// decode attention calls this for tasks of at most 16 query heads). Sixteen
// keys' scores for every head of the task come from one tile product a 32
// values of a key row: A = 16 keys' rows (read from the pool in place when
// their slots are consecutive, as a prompt's are, else gathered), B = the
// query heads' values in AMX's pairs layout, zero for the heads of other KV
// heads; C = [16 keys, heads] float32, stored key-major.
namespace radixserve_amx {

bool attention_available() {
#ifdef RADIXSERVE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// In bfloat16 values: the B tiles (one a 32 values of the task's key row)
// and four blocks' gathered key rows.
int64_t attention_scratch(int64_t kv_heads, int64_t head_dim) {
  return kv_heads * head_dim / 32 * 512 + 4 * 16 * kv_heads * head_dim;
}

#ifdef RADIXSERVE_AMX
namespace {

bool consecutive(const int64_t* slot) {
  for (int j = 1; j < 16; ++j)
    if (slot[j] != slot[0] + j) return false;
  return true;
}

// B tile c: row r holds, for each query head h, its values 2r and 2r + 1 of
// the key row's values 32c..32c + 31 when h reads that KV head, else zeros.
void query_tiles(const uint16_t* q, int64_t head_dim, int64_t group, int64_t kv_heads, uint16_t* tiles) {
  const int64_t per_head = head_dim / 32;
  std::fill(tiles, tiles + kv_heads * per_head * 512, 0);
  for (int64_t c = 0; c < kv_heads * per_head; ++c) {
    const int64_t kh = c / per_head, d0 = c % per_head * 32;
    for (int64_t h = kh * group; h < (kh + 1) * group; ++h)
      for (int64_t r = 0; r < 16; ++r) {
        tiles[c * 512 + r * 32 + 2 * h] = q[h * head_dim + d0 + 2 * r];
        tiles[c * 512 + r * 32 + 2 * h + 1] = q[h * head_dim + d0 + 2 * r + 1];
      }
  }
}

}  // namespace
#endif

// scores [16-key blocks covering n, 16] float32: q_h . k_l unscaled, for the
// task's group * kv_heads (at most 16) query heads q [heads, head_dim] over
// keys k + slot[l] * k_slot_stride (its KV heads k_head_stride apart). scratch:
// attention_scratch values. row_bytes: a slot's key row for the task (the rows four
// blocks ahead that start a run of slots are prefetched).
void attention_scores(const uint16_t* q, int64_t head_dim, int64_t group, int64_t kv_heads, const uint16_t* k,
                      const int64_t* slot, int64_t n, int64_t k_slot_stride, int64_t k_head_stride,
                      int64_t row_bytes, float* scores, uint16_t* scratch) {
#ifdef RADIXSERVE_AMX
  const int64_t per_head = head_dim / 32, chunks = kv_heads * per_head, row = kv_heads * head_dim;
  uint16_t *q_tiles = scratch, *gathered = scratch + chunks * 512;
  query_tiles(q, head_dim, group, kv_heads, q_tiles);
  // tiles 0, 1: key rows (A, taken in turn); 2..5: four blocks' scores (C); 6: the query (B)
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) cfg.rows[t] = 16, cfg.colsb[t] = static_cast<uint16_t>(t < 2 ? 64 : group * kv_heads * 4);
  asm volatile("ldtilecfg %0" : : "m"(cfg));
  // Four blocks of 16 keys at a time: a tile product waits on the last into
  // the same sums, so one block's six in a row ran at their latency.
  for (int64_t l0 = 0; l0 < n; l0 += 64) {
    const int blocks = static_cast<int>(std::min<int64_t>(4, (n - l0 + 15) / 16));
    const uint16_t* a[4];
    int64_t a_stride[4], a_head[4];
    for (int blk = 0; blk < blocks; ++blk) {
      const int64_t first = l0 + 16 * blk, count = std::min<int64_t>(16, n - first);
      if (count == 16 && consecutive(slot + first)) {
        a[blk] = k + slot[first] * k_slot_stride, a_stride[blk] = k_slot_stride * 2, a_head[blk] = k_head_stride;
        continue;
      }
      uint16_t* to = gathered + blk * 16 * row;
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t kh = 0; kh < kv_heads; ++kh) {
          uint16_t* dst = to + j * row + kh * head_dim;
          if (j < count) memcpy(dst, k + slot[first + j] * k_slot_stride + kh * k_head_stride, head_dim * 2);
          else std::fill(dst, dst + head_dim, 0);
        }
      a[blk] = to, a_stride[blk] = row * 2, a_head[blk] = head_dim;
    }
    // the next four blocks' rows where they are not in a run of slots (the
    // hardware prefetcher follows runs; prefetching those too stalled here)
    for (int64_t j = l0 + 64; j < std::min(n, l0 + 128); ++j) {
      if (slot[j] == slot[j - 1] + 1) continue;
      prefetch_lines(k + slot[j] * k_slot_stride, row_bytes);
    }
    const auto key_rows = [&](int blk, int64_t c) { return a[blk] + c / per_head * a_head[blk] + c % per_head * 32; };
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(6, q_tiles + c * 512, 64);
      _tile_loadd(0, key_rows(0, c), a_stride[0]);
      _tile_dpbf16ps(2, 0, 6);
      if (blocks > 1) {
        _tile_loadd(1, key_rows(1, c), a_stride[1]);
        _tile_dpbf16ps(3, 1, 6);
      }
      if (blocks > 2) {
        _tile_loadd(0, key_rows(2, c), a_stride[2]);
        _tile_dpbf16ps(4, 0, 6);
      }
      if (blocks > 3) {
        _tile_loadd(1, key_rows(3, c), a_stride[3]);
        _tile_dpbf16ps(5, 1, 6);
      }
    }
    float* at = scores + l0 * 16;
    _tile_stored(2, at, 64);
    if (blocks > 1) _tile_stored(3, at + 256, 64);
    if (blocks > 2) _tile_stored(4, at + 512, 64);
    if (blocks > 3) _tile_stored(5, at + 768, 64);
  }
  _tile_release();
#else
  (void)q, (void)head_dim, (void)group, (void)kv_heads, (void)k, (void)slot, (void)n, (void)k_slot_stride,
      (void)k_head_stride, (void)row_bytes, (void)scores, (void)scratch;
#endif
}

}  // namespace radixserve_amx

extern "C" {

// Whether the functions below run here: built with AMX and the process
// allowed to use it. Where not, they return -1 and write nothing.
int radixserve_amx_available() {
#ifdef RADIXSERVE_AMX
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// out [rows, n] bfloat16 (contiguous) = x [rows, k] bfloat16 (row stride
// x_stride) times an int4 weight packed for AMX, its bfloat16 scales_zeros
// [k / group, n, 2]. n, k and group multiples of 32. Returns 0, or -1.
int radixserve_int4_linear_amx(const uint16_t* x, int64_t x_stride, const uint8_t* packed,
                               const uint16_t* scales_zeros, uint16_t* out, int64_t rows, int64_t n, int64_t k,
                               int64_t group) {
#ifdef RADIXSERVE_AMX
  if (!amx_permitted()) return -1;
  const Int4Groups weight{packed, scales_zeros, n, k, group};
  if (int4_takes_few_rows(rows, k, group)) int4_few_rows(x, x_stride, weight, out, rows);
  else amx_linear(x, x_stride, weight, out, rows);
  return 0;
#else
  (void)x, (void)x_stride, (void)packed, (void)scales_zeros, (void)out, (void)rows, (void)n, (void)k, (void)group;
  return -1;
#endif
}

// The same for an int8 weight packed for AMX with float32 scales [n].
int radixserve_int8_linear_amx(const uint16_t* x, int64_t x_stride, const int8_t* packed, const float* scales,
                               uint16_t* out, int64_t rows, int64_t n, int64_t k) {
#ifdef RADIXSERVE_AMX
  if (!amx_permitted()) return -1;
  amx_linear(x, x_stride, Int8Rows{packed, scales, n, k}, out, rows);
  return 0;
#else
  (void)x, (void)x_stride, (void)packed, (void)scales, (void)out, (void)rows, (void)n, (void)k;
  return -1;
#endif
}

}  // extern "C"
