// The CPU decode step's fused kernels, compiled on first use by cpu_kernels.py
// with this machine's C++ compiler (-O3 -march=native -fopenmp) and called
// through ctypes. Plain C ABI, no torch headers: it builds in about a second.
//
// Why they exist: a CPU decode step of a small model is made of small torch
// calls, each costing more to launch than to run, and its attention gathered
// every request's keys out of the paged pool before SDPA read them again.
// Here decode attention stores the step's K/V and reads the pool in place, and
// the RMSNorm (with its residual add), the gated activation and the rotary
// embedding are one call each.
//
// Threads: OpenMP, the runtime torch itself runs on (the library links
// libgomp.so.1, which resolves to the copy torch already loaded), so the
// kernels use torch's thread count and its pool.
//
// bfloat16 values are uint16_t; arithmetic is in float32, results are rounded
// to nearest even, as torch rounds.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu_kernels_common.h"

// Decode attention's scores on AMX tiles (cpu_kernels_amx.cpp).
namespace radixserve_amx {
bool attention_available();
int64_t attention_scratch(int64_t kv_heads, int64_t head_dim);
void attention_scores(const uint16_t* q, int64_t head_dim, int64_t group, int64_t kv_heads, const uint16_t* k,
                      const int64_t* slot, int64_t n, int64_t k_slot_stride, int64_t k_head_stride,
                      int64_t row_bytes, float* scores, uint16_t* scratch);
}  // namespace radixserve_amx

namespace {

using radixserve_cpu::fast_exp;
#ifdef __AVX512F__
using radixserve_cpu::bf16x16_to_ps;
using radixserve_cpu::round_to_bf16_ps;
using radixserve_cpu::store_bf16x16;
#endif
using radixserve_cpu::prefetch_lines;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(uint16_t* p, int64_t i, float x) { p[i] = float_to_bf16(x); }

// The largest of s[0..n), n >= 1, in 16 lanes: GCC leaves a max reduction
// scalar (one vmaxss a value, each waiting on the last), which was 63% of the
// softmax's time.
inline float max_of(const float* s, int64_t n) {
  float lanes[16];
  std::fill(lanes, lanes + 16, s[0]);
  int64_t l = 0;
  for (; l + 16 <= n; l += 16)
    for (int i = 0; i < 16; ++i) lanes[i] = lanes[i] > s[l + i] ? lanes[i] : s[l + i];
  for (; l < n; ++l) lanes[0] = lanes[0] > s[l] ? lanes[0] : s[l];
  float top = lanes[0];
  for (int i = 1; i < 16; ++i) top = top > lanes[i] ? top : lanes[i];
  return top;
}

// e^(s - max s) over a score row of length n, in place; returns the row's sum.
float exp_row(float* s, int64_t n) {
  const float top = max_of(s, n);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < n; ++l) {
    s[l] = fast_exp(s[l] - top);
    sum += s[l];
  }
  return sum;
}

// Softmax of each of `rows` score rows of length n, in place.
void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * n;
    const float inv = 1.0f / exp_row(s, n);
#pragma omp simd
    for (int64_t l = 0; l < n; ++l) s[l] *= inv;
  }
}

// Keys ahead of the one being read whose rows are prefetched: a request's
// decode slots lie a batch apart in the pool, a stride the hardware
// prefetcher does not follow.
// prefetch_lines takes every cache line of a task's part of a slot's row: a
// whole 384-byte row of the default model's keys is six lines, and
// prefetching only the first left a batch-32 decode step 9% slower
// (45.6-47.8 against 41.2-43.1 ms, three runs each, 2-core AMX Xeon).
constexpr int64_t PREFETCH_AHEAD = 8;

// The tasks of one decode attention call. A task is one request's KV heads,
// as many as keep its query heads within max_heads, when the batch alone keeps
// every thread busy (each slot's row is then read in few runs, in order),
// else one.
struct DecodeTasks {
  int64_t group, kv_heads, per_request;  // query heads a KV head; KV heads a task; tasks a request
  DecodeTasks(int64_t batch, int64_t heads, int64_t all_kv_heads, int64_t max_heads = INT64_MAX)
      : group(heads / all_kv_heads), kv_heads(1) {
    if (batch >= 2 * omp_get_max_threads())
      for (int64_t n = all_kv_heads; n >= 1; --n)
        if (all_kv_heads % n == 0 && n * group <= max_heads) {
          kv_heads = n;
          break;
        }
    per_request = all_kv_heads / kv_heads;
  }
  int64_t heads() const { return kv_heads * group; }
};

// body(state, request, first KV head, its visible slots, how many) for every
// task, on the OpenMP threads, each with its own state = make_state(). With a
// window a request sees only its last `window` positions.
template <typename MakeState, typename Body>
void for_each_task(const DecodeTasks& tasks, int64_t batch, const int64_t* slots, int64_t slots_row_stride,
                   const int64_t* seq_lens, int64_t window, MakeState make_state, Body body) {
#pragma omp parallel
  {
    auto state = make_state();
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < batch * tasks.per_request; ++task) {
      const int64_t b = task / tasks.per_request, h0 = task % tasks.per_request * tasks.kv_heads;
      const int64_t first = window > 0 ? std::max<int64_t>(0, seq_lens[b] - window) : 0;
      body(state, b, h0, slots + b * slots_row_stride + first, seq_lens[b] - first);
    }
  }
}

// One decode query per request over its keys in the paged pool, read where
// they lie (slot by slot); scores and the softmax in float32 (DecodeTasks).
// HEAD_DIM: the key and value head size when known at compile time (the
// common 64 and 128: fully unrolled loops ran 2x faster), else 0.
template <typename T, int HEAD_DIM>
void decode_attention(const T* q, int64_t q_row_stride, const T* k, const T* v, T* out,
                      const int64_t* slots, int64_t slots_row_stride, const int64_t* seq_lens,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t key_dim, int64_t value_dim,
                      int64_t k_slot_stride, int64_t k_head_stride, int64_t v_slot_stride, int64_t v_head_stride,
                      int64_t window, float scale) {
  const int64_t dk = HEAD_DIM ? HEAD_DIM : key_dim, dv = HEAD_DIM ? HEAD_DIM : value_dim;
  const DecodeTasks tasks(batch, heads, kv_heads);
  const int64_t group = tasks.group, task_kv_heads = tasks.kv_heads, task_heads = tasks.heads();
  const int64_t row_bytes_k = ((task_kv_heads - 1) * k_head_stride + dk) * sizeof(T);
  const int64_t row_bytes_v = ((task_kv_heads - 1) * v_head_stride + dv) * sizeof(T);
  struct State {
    std::vector<float> qf, row, acc, scores;
  };
  const auto make_state = [&] {
    return State{std::vector<float>(task_heads * dk), std::vector<float>(std::max(dk, dv)),
                 std::vector<float>(task_heads * dv), {}};
  };
  for_each_task(tasks, batch, slots, slots_row_stride, seq_lens, window, make_state,
                [&](State& st, int64_t b, int64_t h0, const int64_t* slot, int64_t n) {
    T* o = out + (b * heads + h0 * group) * dv;
    if (n <= 0) {
      for (int64_t i = 0; i < task_heads * dv; ++i) store(o, i, 0.0f);
      return;
    }
    float *qf = st.qf.data(), *row = st.row.data(), *acc = st.acc.data();
    const T* qb = q + b * q_row_stride + h0 * group * dk;
    for (int64_t i = 0; i < task_heads * dk; ++i) qf[i] = load(qb, i) * scale;
    st.scores.resize(task_heads * n);
    float* scores = st.scores.data();
    for (int64_t l = 0; l < n; ++l) {
      if (l + PREFETCH_AHEAD < n) prefetch_lines(k + slot[l + PREFETCH_AHEAD] * k_slot_stride + h0 * k_head_stride, row_bytes_k);
      for (int64_t kh = 0; kh < task_kv_heads; ++kh) {
        const T* kp = k + slot[l] * k_slot_stride + (h0 + kh) * k_head_stride;
#pragma omp simd
        for (int64_t i = 0; i < dk; ++i) row[i] = load(kp, i);
        for (int64_t g = kh * group; g < (kh + 1) * group; ++g) {
          const float* qg = qf + g * dk;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < dk; ++i) s += qg[i] * row[i];
          scores[g * n + l] = s;
        }
      }
    }
    softmax_rows(scores, task_heads, n);
    std::fill(acc, acc + task_heads * dv, 0.0f);
    for (int64_t l = 0; l < n; ++l) {
      if (l + PREFETCH_AHEAD < n) prefetch_lines(v + slot[l + PREFETCH_AHEAD] * v_slot_stride + h0 * v_head_stride, row_bytes_v);
      for (int64_t kh = 0; kh < task_kv_heads; ++kh) {
        const T* vp = v + slot[l] * v_slot_stride + (h0 + kh) * v_head_stride;
#pragma omp simd
        for (int64_t i = 0; i < dv; ++i) row[i] = load(vp, i);
        for (int64_t g = kh * group; g < (kh + 1) * group; ++g) {
          const float p = scores[g * n + l];
          float* ag = acc + g * dv;
#pragma omp simd
          for (int64_t i = 0; i < dv; ++i) ag[i] += p * row[i];
        }
      }
    }
    for (int64_t i = 0; i < task_heads * dv; ++i) store(o, i, acc[i]);
  });
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// The bfloat16 decode attention written with AVX-512 BF16 instructions (and
// AMX's tiles for the scores where the CPU has them), for head sizes 64 and
// 128. Scores are kept key-major: row l holds every query head's score for key
// l, padded to 16 lanes a row, so the softmax runs down the rows with one
// vector a key and the weighted sum of values broadcasts a key's weight to a
// few heads at once (12 independent sums for the default model's 3 heads x
// 64 values: the general loop's one head at a time waited on each sum's
// latency).

constexpr int64_t LANES = 16;

// v[j]'s lanes summed, for j < 16, as lane j of one vector: a transposing
// reduction tree (45 instructions for sixteen sums).
inline __m512 sum_lanes_16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // [a0+a2, b0+b2, a1+a3, b1+b3] in each 128-bit lane
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // four vectors' partial sums side by side in each 128-bit lane
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// A task's unscaled scores q_h . k_l, key-major with `stride` floats a key,
// without AMX: sixteen keys' dot products for one query head at a time, two
// (D = 64) bfloat16 dot-product instructions a key reduced together
// (sum_lanes_16). A block's key rows (all the task's KV heads) stay in L1
// while every query head takes them; the next block's are prefetched.
template <int D>
void bf16_scores(const uint16_t* q, const uint16_t* k, const int64_t* slot, int64_t n, int64_t k_slot_stride,
                 int64_t k_head_stride, int64_t kv_heads, int64_t group, int64_t row_bytes, float* scores,
                 int64_t stride) {
  const __m512i key_rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(static_cast<int>(stride)));
  __m512 part[16];
  for (int64_t l0 = 0; l0 < n; l0 += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, n - l0));
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        __m512bh qv[D / 32];
        for (int c = 0; c < D / 32; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * D + 32 * c);
        for (int j = 0; j < 16; ++j) {
          __m512 acc = _mm512_setzero_ps();
          if (j < count) {
            // the next block's rows, one a key: a burst of a whole block's stalled on the CPU's fill buffers
            if (h == 0 && l0 + 16 + j < n) prefetch_lines(k + slot[l0 + 16 + j] * k_slot_stride, row_bytes);
            const uint16_t* kp = k + slot[l0 + j] * k_slot_stride + kh * k_head_stride;
            for (int c = 0; c < D / 32; ++c)
              acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(kp + 32 * c));
          }
          part[j] = acc;
        }
        _mm512_mask_i32scatter_ps(scores + l0 * stride + h, static_cast<__mmask16>((1u << count) - 1), key_rows,
                                  sum_lanes_16(part), 4);
      }
    }
  }
}

// e^(scale * (s - max s)) down each head's column of n key-major score rows
// (`stride` floats a row, a multiple of 16), in place; the columns' sums
// into sums[stride]. scale > 0, so the largest score is the largest scaled.
void softmax_columns(float* scores, int64_t n, int64_t stride, float scale, float* sums) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < stride; c += LANES) {
    __m512 top = _mm512_loadu_ps(scores + c), sum = _mm512_setzero_ps();
    for (int64_t l = 1; l < n; ++l) top = _mm512_max_ps(top, _mm512_loadu_ps(scores + l * stride + c));
    for (int64_t l = 0; l < n; ++l) {
      float* row = scores + l * stride + c;
      const __m512 e = radixserve_cpu::exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row), top), scale_v));
      _mm512_storeu_ps(row, e);
      sum = _mm512_add_ps(sum, e);
    }
    _mm512_storeu_ps(sums + c, sum);
  }
}

// out_h = sum_l weights[l, h] * v_l / sums[h] for HEADS query heads of one KV
// head (weights key-major, `stride` floats a key), rounded to bfloat16. Each
// value row is widened once and taken by every head: HEADS x D / 16
// independent sums. With prefetch_bytes, prefetches the rows PREFETCH_AHEAD
// keys on (the task's first KV head's pass brings every head's rows).
template <int D, int HEADS>
void bf16_weighted_values(const float* weights, int64_t stride, const float* sums, const uint16_t* v,
                          const int64_t* slot, int64_t n, int64_t v_slot_stride, int64_t prefetch_bytes,
                          uint16_t* out) {
  __m512 acc[HEADS][D / 16];
  for (int h = 0; h < HEADS; ++h)
    for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; ++l) {
    if (prefetch_bytes > 0 && l + PREFETCH_AHEAD < n)
      prefetch_lines(v + slot[l + PREFETCH_AHEAD] * v_slot_stride, prefetch_bytes);
    const uint16_t* vp = v + slot[l] * v_slot_stride;
    __m512 row[D / 16];
    for (int c = 0; c < D / 16; ++c) row[c] = bf16x16_to_ps(vp + 16 * c);
    for (int h = 0; h < HEADS; ++h) {
      const __m512 w = _mm512_set1_ps(weights[l * stride + h]);
      for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_fmadd_ps(w, row[c], acc[h][c]);
    }
  }
  for (int h = 0; h < HEADS; ++h) {
    const __m512 inv = _mm512_set1_ps(1.0f / sums[h]);
    for (int c = 0; c < D / 16; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * D + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[h][c], inv)));
  }
}

// The heads a weighted-values pass takes at once: their sums, a value row
// and a broadcast weight fit the 32 vector registers.
template <int D>
constexpr int values_pass_heads() { return D == 64 ? 6 : 2; }

// bf16_weighted_values for `heads` (1 to values_pass_heads) heads: the head
// count is a template argument so that the sums stay in registers.
template <int D, int HEADS = values_pass_heads<D>()>
void bf16_weighted_values_n(int64_t heads, const float* weights, int64_t stride, const float* sums,
                            const uint16_t* v, const int64_t* slot, int64_t n, int64_t v_slot_stride,
                            int64_t prefetch_bytes, uint16_t* out) {
  if constexpr (HEADS > 1) {
    if (heads < HEADS) {
      bf16_weighted_values_n<D, HEADS - 1>(heads, weights, stride, sums, v, slot, n, v_slot_stride, prefetch_bytes,
                                           out);
      return;
    }
  }
  bf16_weighted_values<D, HEADS>(weights, stride, sums, v, slot, n, v_slot_stride, prefetch_bytes, out);
}

template <int D>
void decode_attention_bf16_avx512(const uint16_t* q, int64_t q_row_stride, const uint16_t* k, const uint16_t* v,
                                  uint16_t* out, const int64_t* slots, int64_t slots_row_stride,
                                  const int64_t* seq_lens, int64_t batch, int64_t heads, int64_t kv_heads,
                                  int64_t k_slot_stride, int64_t k_head_stride, int64_t v_slot_stride,
                                  int64_t v_head_stride, int64_t window, float scale) {
  // tasks of at most 16 query heads where AMX takes the scores (a tile's 16 columns)
  const bool amx = radixserve_amx::attention_available();
  const DecodeTasks tasks(batch, heads, kv_heads, amx ? LANES : INT64_MAX);
  const int64_t group = tasks.group, task_kv_heads = tasks.kv_heads, task_heads = tasks.heads();
  const bool amx_scores = amx && task_heads <= LANES;
  const int64_t stride = (task_heads + LANES - 1) / LANES * LANES;
  const int64_t row_bytes_k = ((task_kv_heads - 1) * k_head_stride + D) * 2;
  const int64_t row_bytes_v = ((task_kv_heads - 1) * v_head_stride + D) * 2;
  struct State {
    std::vector<float> scores, sums;
    std::vector<uint16_t> scratch;
  };
  const auto make_state = [&] {
    return State{{}, std::vector<float>(stride),
                 std::vector<uint16_t>(amx_scores ? radixserve_amx::attention_scratch(task_kv_heads, D) : 0)};
  };
  for_each_task(tasks, batch, slots, slots_row_stride, seq_lens, window, make_state,
                [&](State& st, int64_t b, int64_t h0, const int64_t* slot, int64_t n) {
    uint16_t* o = out + (b * heads + h0 * group) * D;
    if (n <= 0) {
      memset(o, 0, task_heads * D * sizeof(uint16_t));
      return;
    }
    st.scores.resize((n + LANES - 1) / LANES * LANES * stride);
    float* scores = st.scores.data();
    const uint16_t* qb = q + b * q_row_stride + h0 * group * D;
    const uint16_t* kb = k + h0 * k_head_stride;
    if (amx_scores) {
      radixserve_amx::attention_scores(qb, D, group, task_kv_heads, kb, slot, n, k_slot_stride, k_head_stride,
                                       row_bytes_k, scores, st.scratch.data());
    } else {
      bf16_scores<D>(qb, kb, slot, n, k_slot_stride, k_head_stride, task_kv_heads, group, row_bytes_k, scores,
                     stride);
    }
    softmax_columns(scores, n, stride, scale, st.sums.data());
    for (int64_t kh = 0; kh < task_kv_heads; ++kh) {
      for (int64_t h = kh * group; h < (kh + 1) * group; h += values_pass_heads<D>()) {
        bf16_weighted_values_n<D>(std::min<int64_t>(values_pass_heads<D>(), (kh + 1) * group - h), scores + h,
                                  stride, st.sums.data() + h, v + (h0 + kh) * v_head_stride, slot, n, v_slot_stride,
                                  h == 0 ? row_bytes_v : 0, o + h * D);
      }
    }
  });
}
#endif

template <typename T, typename... Rest>
void decode_attention_any_dim(const T* q, int64_t q_row_stride, const T* k, const T* v, T* out, const int64_t* slots,
                              int64_t slots_row_stride, const int64_t* seq_lens, int64_t batch, int64_t heads,
                              int64_t kv_heads, int64_t dk, int64_t dv, Rest... rest) {
  if (dk == 64 && dv == 64) {
    decode_attention<T, 64>(q, q_row_stride, k, v, out, slots, slots_row_stride, seq_lens, batch, heads, kv_heads,
                            dk, dv, rest...);
  } else if (dk == 128 && dv == 128) {
    decode_attention<T, 128>(q, q_row_stride, k, v, out, slots, slots_row_stride, seq_lens, batch, heads, kv_heads,
                             dk, dv, rest...);
  } else {
    decode_attention<T, 0>(q, q_row_stride, k, v, out, slots, slots_row_stride, seq_lens, batch, heads, kv_heads,
                           dk, dv, rest...);
  }
}

// One row of silu(gate) * up, x = [gate | up]. GCC left the scalar loop
// unvectorized (1.6 ns an element: 30 us of a batch-32 decode layer).
void silu_and_mul_row(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t cols) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= cols; i += 16) {
    const __m512 g = bf16x16_to_ps(gate + i);
    const __m512 e = radixserve_cpu::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = round_to_bf16_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)));
    store_bf16x16(out + i, _mm512_mul_ps(silu, bf16x16_to_ps(up + i)));
  }
#endif
  for (; i < cols; ++i) {
    const float g = bf16_to_float(gate[i]);
    const float silu = bf16_to_float(float_to_bf16(g / (1.0f + fast_exp(-g))));
    out[i] = float_to_bf16(silu * bf16_to_float(up[i]));
  }
}

// One row of radixserve_rms_norm_bf16 (s: cols floats of scratch). The
// vector loops do what the scalar tails do, 16 values at a time (GCC left the
// scalar loops unvectorized), except that the squares are summed in 16 lanes:
// the output can differ from the plain build's by a bfloat16 step or two.
void rms_norm_row(const uint16_t* xr, const uint16_t* rr, const uint16_t* weight, uint16_t* o, uint16_t* ro,
                  int64_t cols, float eps, float* s) {
  float squares = 0.0f;
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 sum = _mm512_setzero_ps();
  for (; i + 16 <= cols; i += 16) {
    __m512 v = bf16x16_to_ps(xr + i);
    if (rr != nullptr) {
      v = round_to_bf16_ps(_mm512_add_ps(v, bf16x16_to_ps(rr + i)));
      store_bf16x16(ro + i, v);
    }
    _mm512_storeu_ps(s + i, v);
    sum = _mm512_fmadd_ps(v, v, sum);
  }
  squares = _mm512_reduce_add_ps(sum);
#endif
  for (; i < cols; ++i) {
    if (rr != nullptr) ro[i] = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(rr[i]));
    s[i] = bf16_to_float(rr != nullptr ? ro[i] : xr[i]);
    squares += s[i] * s[i];
  }
  const float inv_rms = 1.0f / __builtin_sqrtf(squares / static_cast<float>(cols) + eps);
  i = 0;
#ifdef __AVX512F__
  const __m512 inv = _mm512_set1_ps(inv_rms);
  for (; i + 16 <= cols; i += 16) {
    const __m512 normed = round_to_bf16_ps(_mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
    store_bf16x16(o + i, _mm512_mul_ps(bf16x16_to_ps(weight + i), normed));
  }
#endif
  for (; i < cols; ++i) o[i] = float_to_bf16(bf16_to_float(weight[i]) * bf16_to_float(float_to_bf16(s[i] * inv_rms)));
}

// The new tokens' K or V rows [count, heads * d] (row stride in elements) into
// the pool at their slots, one head at a time (strides in elements, `size`
// bytes each): the decode step's KV store, done here to save two torch calls.
void store_rows(char* pool, const void* rows, int64_t row_stride, const int64_t* slots, int64_t count, int64_t heads,
                int64_t d, int64_t slot_stride, int64_t head_stride, int64_t size) {
  const char* src = static_cast<const char*>(rows);
  for (int64_t t = 0; t < count; ++t)
    for (int64_t h = 0; h < heads; ++h)
      memcpy(pool + (slots[t] * slot_stride + h * head_stride) * size, src + (t * row_stride + h * d) * size, d * size);
}

// Elements below which a row kernel stays on the calling thread: waking the
// pool costs more than a decode step's few rows of a small model take. At
// 8,192 a batch-32 RMSNorm of the default model (18,432 values) splits: 19.9
// -> 14.3 us a call (32,768 kept it on one thread; 2-core AMX Xeon).
constexpr int64_t PARALLEL_FROM = 1 << 13;

// x1 * cos - x2 * sin | x2 * cos + x1 * sin per head, in float32, rounded once.
// Products and sum rounded one by one (no fused multiply-add), as torch's
// rotation rounds them: the same bits as the torch path. The default model's
// greedy answer to a chat question turned on a 1-ulp difference here (its top
// two logits 0.125 apart).
template <typename T>
__attribute__((optimize("fp-contract=off"))) void rotary(const T* x, int64_t x_stride, const int64_t* positions, const float* table, T* out, int64_t rows,
            int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for if (rows * heads * head_dim >= PARALLEL_FROM)
  for (int64_t r = 0; r < rows; ++r) {
    const float* cos = table + positions[r] * head_dim;
    const float* sin = cos + half;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + r * x_stride + h * head_dim;
      T* o = out + (r * heads + h) * head_dim;
#pragma omp simd
      for (int64_t j = 0; j < half; ++j) {
        const float x1 = load(xh, j), x2 = load(xh, j + half);
        store(o, j, x1 * cos[j] - x2 * sin[j]);
        store(o, j + half, x2 * cos[j] + x1 * sin[j]);
      }
    }
  }
}


// ---- sampling: argmax(logits / temperature + Gumbel noise) per row ----

// ln x for x > 0 normal, to about 2 ulp (Cephes' logf: x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), a degree-8 polynomial in m - 1), vectorizable.
inline float fast_log(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  int32_t e = static_cast<int32_t>(bits >> 23) - 126;
  bits = (bits & 0x007fffffu) | 0x3f000000u;  // m in [0.5, 1)
  float m;
  memcpy(&m, &bits, sizeof m);
  const bool small = m < 0.707106781186547524f;
  e -= small ? 1 : 0;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// The sampler's 32-bit hash (sampler._mix32): bijective on uint32.
inline uint32_t mix32(uint32_t x) {
  constexpr uint32_t MUL = 0x45D9F3Bu;
  x = ((x >> 16) ^ x) * MUL;
  x = ((x >> 16) ^ x) * MUL;
  return (x >> 16) ^ x;
}

}  // namespace

extern "C" {

int radixserve_openmp_threads() { return omp_get_max_threads(); }

// dtype: 0 float32, 1 bfloat16 (q, the pool and out share it). With new_slots,
// first stores each request's new key and value rows (new_k, new_v [batch,
// kv_heads * d], row strides in elements) into the pool at new_slots[i]. q [batch, heads * dk]
// with row stride q_row_stride; out [batch, heads * dv] contiguous; slots
// [batch, >= longest] (row stride slots_row_stride); window 0: none.
void radixserve_decode_attention(int dtype, const void* q, int64_t q_row_stride, void* k, void* v,
                                 void* out, const int64_t* slots, int64_t slots_row_stride,
                                 const int64_t* seq_lens, int64_t batch, int64_t heads, int64_t kv_heads,
                                 int64_t dk, int64_t dv, int64_t k_slot_stride, int64_t k_head_stride,
                                 int64_t v_slot_stride, int64_t v_head_stride, int64_t window, float scale,
                                 const void* new_k, int64_t new_k_stride, const void* new_v, int64_t new_v_stride,
                                 const int64_t* new_slots) {
  const int64_t size = dtype == 0 ? 4 : 2;
  if (new_slots != nullptr) {
    store_rows(static_cast<char*>(k), new_k, new_k_stride, new_slots, batch, kv_heads, dk, k_slot_stride,
               k_head_stride, size);
    store_rows(static_cast<char*>(v), new_v, new_v_stride, new_slots, batch, kv_heads, dv, v_slot_stride,
               v_head_stride, size);
  }
  if (dtype == 0) {
    decode_attention_any_dim(static_cast<const float*>(q), q_row_stride, static_cast<const float*>(k),
                             static_cast<const float*>(v), static_cast<float*>(out), slots, slots_row_stride,
                             seq_lens, batch, heads, kv_heads, dk, dv, k_slot_stride, k_head_stride, v_slot_stride,
                             v_head_stride, window, scale);
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const auto* q16 = static_cast<const uint16_t*>(q);
  const auto *k16 = static_cast<const uint16_t*>(k), *v16 = static_cast<const uint16_t*>(v);
  auto* out16 = static_cast<uint16_t*>(out);
  if (dk == 64 && dv == 64) {
    decode_attention_bf16_avx512<64>(q16, q_row_stride, k16, v16, out16, slots, slots_row_stride, seq_lens, batch,
                                     heads, kv_heads, k_slot_stride, k_head_stride, v_slot_stride, v_head_stride,
                                     window, scale);
    return;
  }
  if (dk == 128 && dv == 128) {
    decode_attention_bf16_avx512<128>(q16, q_row_stride, k16, v16, out16, slots, slots_row_stride, seq_lens, batch,
                                      heads, kv_heads, k_slot_stride, k_head_stride, v_slot_stride, v_head_stride,
                                      window, scale);
    return;
  }
#endif
  decode_attention_any_dim(static_cast<const uint16_t*>(q), q_row_stride, static_cast<const uint16_t*>(k),
                           static_cast<const uint16_t*>(v), static_cast<uint16_t*>(out), slots, slots_row_stride,
                           seq_lens, batch, heads, kv_heads, dk, dv, k_slot_stride, k_head_stride, v_slot_stride,
                           v_head_stride, window, scale);
}

// bfloat16 RMSNorm in transformers' order: s = x + residual (rounded; written
// to residual_out when residual is given), normalized in float32, rounded,
// times weight, rounded. x and residual rows have strides; outputs are contiguous.
void radixserve_rms_norm_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* residual, int64_t residual_stride,
                              const uint16_t* weight, uint16_t* out, uint16_t* residual_out, int64_t rows,
                              int64_t cols, float eps) {
#pragma omp parallel if (rows * cols >= PARALLEL_FROM)
  {
    std::vector<float> s(cols);
#pragma omp for
    for (int64_t r = 0; r < rows; ++r)
      rms_norm_row(x + r * x_stride, residual == nullptr ? nullptr : residual + r * residual_stride, weight,
                   out + r * cols, residual_out == nullptr ? nullptr : residual_out + r * cols, cols, eps, s.data());
  }
}

// bfloat16 silu(gate) * up over x = [gate | up] rows (row stride x_stride),
// each rounded as torch rounds them: out [rows, cols] contiguous.
void radixserve_silu_and_mul_bf16(const uint16_t* x, int64_t x_stride, uint16_t* out, int64_t rows, int64_t cols) {
#pragma omp parallel for if (rows * cols >= PARALLEL_FROM)
  for (int64_t r = 0; r < rows; ++r) silu_and_mul_row(x + r * x_stride, x + r * x_stride + cols, out + r * cols, cols);
}

// out = a + b in bfloat16 (each sum rounded as torch rounds it), rows of
// `cols` values with their own row strides: an EAGLE-3 head's input, a layer's
// output plus the residual stream, from the fused decode layers.
void radixserve_add_bf16(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t b_stride, uint16_t* out,
                         int64_t out_stride, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * out_stride + c] = float_to_bf16(bf16_to_float(a[r * a_stride + c]) + bf16_to_float(b[r * b_stride + c]));
}

// Rotary embedding of `heads` heads of head_dim values in each row of x (row
// stride x_stride; q's and k's heads side by side), the halves of each head
// turned by the row's position: table [positions, head_dim] float32, cos of
// the half's frequencies then their sin. out [rows, heads * head_dim] contiguous.
void radixserve_rotary(int dtype, const void* x, int64_t x_stride, const int64_t* positions, const float* table,
                       void* out, int64_t rows, int64_t heads, int64_t head_dim) {
  if (dtype == 0) {
    rotary(static_cast<const float*>(x), x_stride, positions, table, static_cast<float*>(out), rows, heads, head_dim);
  } else {
    rotary(static_cast<const uint16_t*>(x), x_stride, positions, table, static_cast<uint16_t*>(out), rows, heads,
           head_dim);
  }
}

// The index of the largest of row[0..n), the first on a tie; of the first
// NaN where there is one. Lanes keep their own first largest (a strictly
// greater value replaces it), then the lowest index among the lanes holding
// the largest.
inline int64_t first_argmax(const float* row, int64_t n) {
  int64_t j = 0, best = 0;
  float top = row[0];
#ifdef __AVX512F__
  if (n >= 16) {
    __m512 values = _mm512_loadu_ps(row);
    __m512i index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), at = index;
    __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
    const __m512i step = _mm512_set1_epi32(16);
    for (j = 16; j + 16 <= n && j + 16 <= INT32_MAX; j += 16) {
      at = _mm512_add_epi32(at, step);
      const __m512 v = _mm512_loadu_ps(row + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, values, _CMP_GT_OQ);
      values = _mm512_mask_mov_ps(values, greater, v);
      index = _mm512_mask_mov_epi32(index, greater, at);
    }
    if (nan) {
      for (int64_t k = 0; k < n; ++k)
        if (row[k] != row[k]) return k;
    }
    top = _mm512_reduce_max_ps(values);
    const __mmask16 holders = _mm512_cmp_ps_mask(values, _mm512_set1_ps(top), _CMP_EQ_OQ);
    best = _mm512_mask_reduce_min_epi32(holders, index);
  }
#endif
  for (; j < n; ++j) {  // the tail (or every value without AVX-512): any NaN before it returned above
    if (row[j] != row[j]) return j;
    if (row[j] > top) top = row[j], best = j;
  }
  return best;
}

// Each of `rows` float32 rows' (row stride `stride`, n values) index of
// its largest value, the first on a tie; a row holding NaN gives its first
// NaN (as torch's max(dim).indices). out: int64 [rows]. torch's max over a
// verify's 4 x 49,152 logits took 0.16 ms on a 2-core Zen 4.
void radixserve_row_argmax(const float* x, int64_t stride, int64_t rows, int64_t n, int64_t* out) {
#pragma omp parallel for if (rows * n >= PARALLEL_FROM)
  for (int64_t r = 0; r < rows; ++r) out[r] = first_argmax(x + r * stride, n);
}

// Gumbel-max sampling of each of `rows` float32 logit rows (row stride
// `stride`, `vocab` values): the index of the largest logits / temperature +
// g, g = -ln(-ln u) with u the sampler's seeded uniform of (seed, step,
// token) (sampler.seeded_uniform: the same bits of u). The first index on
// ties (first_argmax: a NaN value's index where there is one). out: int64 [rows].
void radixserve_gumbel_argmax(const float* logits, int64_t stride, const float* temperatures, const int64_t* seeds,
                              const int64_t* steps, int64_t* out, int64_t rows, int64_t vocab) {
  constexpr uint32_t SEED_SALT = 0x243F6A88u, TOKEN_SALT = 0x9E3779B9u;
#pragma omp parallel
  {
    std::vector<float> values(vocab);
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t seed = static_cast<uint64_t>(seeds[r]);
      uint32_t key = mix32(static_cast<uint32_t>(seed) ^ SEED_SALT);
      key = mix32(key ^ static_cast<uint32_t>(seed >> 32));
      key = mix32(key ^ static_cast<uint32_t>(static_cast<uint64_t>(steps[r])));
      const float* __restrict row = logits + r * stride;
      float* __restrict v = values.data();
      const float temperature = temperatures[r];
#pragma omp simd
      for (int64_t j = 0; j < vocab; ++j) {
        const uint32_t bits = mix32(key ^ mix32(static_cast<uint32_t>(j) ^ TOKEN_SALT));
        // 23 bits, so k + 0.5 is exact and u stays inside (0, 1)
        const float u = (static_cast<float>(static_cast<int32_t>(bits >> 9)) + 0.5f) * (1.0f / 8388608.0f);
        v[j] = row[j] / temperature - fast_log(-fast_log(u));
      }
      out[r] = first_argmax(v, vocab);
    }
  }
}

}  // extern "C"
