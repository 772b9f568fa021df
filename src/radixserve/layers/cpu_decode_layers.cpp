// A decode step's decoder layers of a Llama-shaped model (or a speculative
// verify's, whose tokens attend as decode queries) in one call from
// Python (model_executor/cpu_decode_layers.py): RMSNorm, q|k|v, rotary,
// attention over the paged pool, o, RMSNorm, gate|up, SiLU, down, for every
// layer. Each part is the kernel the eager path calls, with the same inputs,
// so the results are the eager path's bit for bit; what goes is the Python
// between the kernels (about a third of a batch-32 step on a 2-core CPU, during
// which the other OpenMP thread waits). int4 weights on AMX, else on
// AVX-512 BF16 (each linear takes the kernel the eager path takes): the
// formats of the default model's decode step. An EAGLE-3 draft head's one
// layer (int8 weights, as the CPU quantizes a head) runs the same way:
// radixserve_eagle3_layer.

#include <stdint.h>
#include <string.h>

extern "C" {
// cpu_kernels.cpp, cpu_kernels_amx.cpp and cpu_kernels_avx512.cpp
void radixserve_decode_attention(int dtype, const void* q, int64_t q_row_stride, void* k, void* v, void* out,
                                 const int64_t* slots, int64_t slots_row_stride, const int64_t* seq_lens,
                                 int64_t batch, int64_t heads, int64_t kv_heads, int64_t dk, int64_t dv,
                                 int64_t k_slot_stride, int64_t k_head_stride, int64_t v_slot_stride,
                                 int64_t v_head_stride, int64_t window, float scale, const void* new_k,
                                 int64_t new_k_stride, const void* new_v, int64_t new_v_stride,
                                 const int64_t* new_slots);
void radixserve_rms_norm_bf16(const uint16_t* x, int64_t x_stride, const uint16_t* residual, int64_t residual_stride,
                              const uint16_t* weight, uint16_t* out, uint16_t* residual_out, int64_t rows,
                              int64_t cols, float eps);
void radixserve_silu_and_mul_bf16(const uint16_t* x, int64_t x_stride, uint16_t* out, int64_t rows, int64_t cols);
void radixserve_rotary(int dtype, const void* x, int64_t x_stride, const int64_t* positions, const float* table,
                       void* out, int64_t rows, int64_t heads, int64_t head_dim);
int radixserve_int4_linear_amx(const uint16_t* x, int64_t x_stride, const uint8_t* packed,
                               const uint16_t* scales_zeros, uint16_t* out, int64_t rows, int64_t n, int64_t k,
                               int64_t group);
void radixserve_add_bf16(const uint16_t* a, int64_t a_stride, const uint16_t* b, int64_t b_stride, uint16_t* out,
                         int64_t out_stride, int64_t rows, int64_t cols);
int radixserve_int8_linear_amx(const uint16_t* x, int64_t x_stride, const int8_t* packed, const float* scales,
                               uint16_t* out, int64_t rows, int64_t n, int64_t k);
int radixserve_int4_linear_avx512(const uint16_t* x, int64_t x_stride, const uint8_t* packed,
                                  const uint16_t* scales_zeros, uint16_t* out, int64_t rows, int64_t n, int64_t k,
                                  int64_t group);
int radixserve_int8_linear_avx512(const uint16_t* x, int64_t x_stride, const int8_t* packed, const float* scales,
                                  uint16_t* out, int64_t rows, int64_t n, int64_t k);
int radixserve_int8_linear_vnni(const uint16_t* x, int64_t x_stride, const uint8_t* packed, const float* scales,
                                uint16_t* out, int64_t rows, int64_t n, int64_t k);
}

namespace {

// An int4 weight [n, k] in the AMX kernel's layout, groups of `group` inputs.
struct Int4Weight {
  const uint8_t* packed;
  const uint16_t* scales_zeros;
  int64_t n, k, group;
};

// The layout of this struct and the next two is mirrored by ctypes
// Structures in model_executor/cpu_decode_layers.py.
struct DecodeLayer {
  const uint16_t* input_norm;
  const uint16_t* post_attention_norm;
  Int4Weight qkv, o, gate_up, down;
  uint16_t* k_buf;
  uint16_t* v_buf;
  int64_t window;  // 0: none
};

struct DecodeShape {
  int64_t hidden, heads, kv_heads, head_dim, intermediate;
  int64_t k_slot_stride, k_head_stride, v_slot_stride, v_head_stride;
  float eps, scale;
  const float* rope_table;  // [positions, head_dim] cos | sin
};

// A row is a decode query: a decode batch's request, or one token of a
// speculative verify (its slots: the prefix's, then its own ancestors' and its
// own, as plain decoding of its path would see them).
struct DecodeBatch {
  int64_t rows;
  const int64_t* positions;
  const int64_t* slots;  // [rows, >= longest]: each row's slots in position order
  int64_t slots_row_stride;
  const int64_t* seq_lens;
  const int64_t* new_slots;  // [rows]: where this step's keys and values go
  // An EAGLE-3 target's captured layers: layer capture[j]'s output plus the
  // residual stream into aux + j * hidden (row stride aux_stride); -1: none.
  const int64_t* capture;
  int64_t num_capture;
  uint16_t* aux;
  int64_t aux_stride;
};

// bfloat16 buffers [rows, width] for one step.
struct Scratch {
  uint16_t *normed, *qkv, *qk, *attn, *gate_up, *act;
};

// The AMX kernel where the process has AMX (as quantization.py routes the
// eager linears), else the AVX-512 BF16 one; -1 where neither runs.
int linear(const Int4Weight& w, const uint16_t* x, uint16_t* out, int64_t rows) {
  if (radixserve_int4_linear_amx(x, w.k, w.packed, w.scales_zeros, out, rows, w.n, w.k, w.group) == 0) return 0;
  return radixserve_int4_linear_avx512(x, w.k, w.packed, w.scales_zeros, out, rows, w.n, w.k, w.group);
}

// An int8 weight [n, k] in the AMX kernel's layout, or where `vnni` is 1 in
// the VNNI kernel's (a CPU without AMX that has VNNI), float32 scales [n].
struct Int8Weight {
  const int8_t* packed;
  const float* scales;
  int64_t n, k, vnni;
};

int linear(const Int8Weight& w, const uint16_t* x, int64_t x_stride, uint16_t* out, int64_t rows) {
  if (w.vnni)
    return radixserve_int8_linear_vnni(x, x_stride, reinterpret_cast<const uint8_t*>(w.packed), w.scales, out, rows,
                                       w.n, w.k);
  if (radixserve_int8_linear_amx(x, x_stride, w.packed, w.scales, out, rows, w.n, w.k) == 0) return 0;
  return radixserve_int8_linear_avx512(x, x_stride, w.packed, w.scales, out, rows, w.n, w.k);
}

// An EAGLE-3 head's layer (models/llama_eagle3.py), mirrored by a ctypes
// Structure in model_executor/cpu_eagle3_layer.py.
struct Eagle3Layer {
  const uint16_t* input_norm;  // of the token's embedding
  const uint16_t* hidden_norm;  // of the hidden state
  const uint16_t* post_attention_norm;
  Int8Weight fc, qkv, o, gate_up, down;
  uint16_t* k_buf;
  uint16_t* v_buf;
};

// q|k rotated, then attention of each row as a decode query over the paged
// pool, its own new key and value stored first: the target's layer's middle.
void rotary_and_attention(const DecodeShape& s, const DecodeBatch& b, uint16_t* k_buf, uint16_t* v_buf,
                          int64_t window, const uint16_t* qkv, uint16_t* qk, uint16_t* attn) {
  const int64_t q_width = s.heads * s.head_dim, kv_width = s.kv_heads * s.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width, qk_width = q_width + kv_width;
  radixserve_rotary(1, qkv, qkv_width, b.positions, s.rope_table, qk, b.rows, s.heads + s.kv_heads, s.head_dim);
  radixserve_decode_attention(1, qk, qk_width, k_buf, v_buf, attn, b.slots, b.slots_row_stride, b.seq_lens, b.rows,
                              s.heads, s.kv_heads, s.head_dim, s.head_dim, s.k_slot_stride, s.k_head_stride,
                              s.v_slot_stride, s.v_head_stride, window, s.scale, qk + q_width, qk_width,
                              qkv + qk_width, qkv_width, b.new_slots);
}

int run_layer(const DecodeShape& s, const DecodeLayer& layer, const DecodeBatch& b, uint16_t* hidden,
              uint16_t* residual, bool first, const Scratch& t) {
  const int64_t rows = b.rows;
  if (first) {  // no residual yet: the embeddings are it
    memcpy(residual, hidden, rows * s.hidden * sizeof(uint16_t));
    radixserve_rms_norm_bf16(hidden, s.hidden, nullptr, 0, layer.input_norm, t.normed, nullptr, rows, s.hidden, s.eps);
  } else {
    radixserve_rms_norm_bf16(hidden, s.hidden, residual, s.hidden, layer.input_norm, t.normed, residual, rows,
                             s.hidden, s.eps);
  }
  if (linear(layer.qkv, t.normed, t.qkv, rows) != 0) return -1;
  // q | k turned in one pass (their columns side by side in q|k|v); v read where it lies
  rotary_and_attention(s, b, layer.k_buf, layer.v_buf, layer.window, t.qkv, t.qk, t.attn);
  if (linear(layer.o, t.attn, hidden, rows) != 0) return -1;
  radixserve_rms_norm_bf16(hidden, s.hidden, residual, s.hidden, layer.post_attention_norm, t.normed, residual, rows,
                           s.hidden, s.eps);
  if (linear(layer.gate_up, t.normed, t.gate_up, rows) != 0) return -1;
  radixserve_silu_and_mul_bf16(t.gate_up, 2 * s.intermediate, t.act, rows, s.intermediate);
  return linear(layer.down, t.act, hidden, rows);
}

}  // namespace

extern "C" {

// hidden [rows, hidden]: the embeddings in, the last layer's output out;
// residual [rows, hidden]: the residual stream before that output (the final
// norm adds them, as after the eager layers). scratch: bfloat16 values for
// rows x (hidden + q|k|v + q|k + q + 2 intermediate + intermediate). 0 when
// done; -1 when neither AMX nor AVX-512 BF16 runs here (nothing meaningful written).
int radixserve_decode_layers(const DecodeShape* shape, const DecodeLayer* layers, int64_t num_layers,
                             const DecodeBatch* batch, uint16_t* hidden, uint16_t* residual, uint16_t* scratch) {
  const DecodeShape& s = *shape;
  const int64_t rows = batch->rows, q_width = s.heads * s.head_dim, kv_width = s.kv_heads * s.head_dim;
  Scratch t;
  t.normed = scratch;
  t.qkv = t.normed + rows * s.hidden;
  t.qk = t.qkv + rows * (q_width + 2 * kv_width);
  t.attn = t.qk + rows * (q_width + kv_width);
  t.gate_up = t.attn + rows * q_width;
  t.act = t.gate_up + rows * 2 * s.intermediate;
  for (int64_t i = 0; i < num_layers; ++i) {
    if (run_layer(s, layers[i], *batch, hidden, residual, i == 0, t) != 0) return -1;
    for (int64_t j = 0; j < batch->num_capture; ++j)
      if (batch->capture[j] == i)
        radixserve_add_bf16(hidden, s.hidden, residual, s.hidden, batch->aux + j * s.hidden, batch->aux_stride, rows,
                            s.hidden);
  }
  return 0;
}

// An EAGLE-3 head's layer for a batch of decode queries (a draft step, or a
// catch-up of a few tokens each attending as a decode query), as the eager
// head computes it: hidden = fc(features) (or features, where a step feeds
// the layer's own output back: features_width == hidden), then attention over
// [norm(embeds) ; norm(hidden)], the residual add, the MLP and its add. out
// [rows, hidden]: the layer's output (before the final norm). scratch:
// bfloat16 values for rows x (4 hidden + q|k|v + q|k + q + 3
// intermediate). 0 when done; -1 when neither AMX nor AVX-512 BF16 runs here.
int radixserve_eagle3_layer(const DecodeShape* shape, const Eagle3Layer* layer, const DecodeBatch* batch,
                            const uint16_t* embeds, const uint16_t* features, int64_t features_stride,
                            int64_t features_width, uint16_t* out, uint16_t* scratch) {
  const DecodeShape& s = *shape;
  const Eagle3Layer& l = *layer;
  const int64_t rows = batch->rows, h = s.hidden, q_width = s.heads * s.head_dim, kv_width = s.kv_heads * s.head_dim;
  uint16_t* x = scratch;  // [rows, 2 hidden]: the attention's input
  uint16_t* normed = x + rows * 2 * h;
  uint16_t* qkv = normed + rows * h;
  uint16_t* qk = qkv + rows * (q_width + 2 * kv_width);
  uint16_t* attn = qk + rows * (q_width + kv_width);
  uint16_t* hidden = attn + rows * q_width;
  uint16_t* gate_up = hidden + rows * h;
  uint16_t* act = gate_up + rows * 2 * s.intermediate;
  if (features_width != h) {
    if (linear(l.fc, features, features_stride, hidden, rows) != 0) return -1;
  } else {
    for (int64_t r = 0; r < rows; ++r) memcpy(hidden + r * h, features + r * features_stride, h * sizeof(uint16_t));
  }
  radixserve_rms_norm_bf16(embeds, h, nullptr, 0, l.input_norm, normed, nullptr, rows, h, s.eps);
  for (int64_t r = 0; r < rows; ++r) memcpy(x + r * 2 * h, normed + r * h, h * sizeof(uint16_t));
  radixserve_rms_norm_bf16(hidden, h, nullptr, 0, l.hidden_norm, normed, nullptr, rows, h, s.eps);
  for (int64_t r = 0; r < rows; ++r) memcpy(x + r * 2 * h + h, normed + r * h, h * sizeof(uint16_t));
  if (linear(l.qkv, x, 2 * h, qkv, rows) != 0) return -1;
  rotary_and_attention(s, *batch, l.k_buf, l.v_buf, 0, qkv, qk, attn);
  if (linear(l.o, attn, q_width, out, rows) != 0) return -1;
  radixserve_add_bf16(hidden, h, out, h, hidden, h, rows, h);
  radixserve_rms_norm_bf16(hidden, h, nullptr, 0, l.post_attention_norm, normed, nullptr, rows, h, s.eps);
  if (linear(l.gate_up, normed, h, gate_up, rows) != 0) return -1;
  radixserve_silu_and_mul_bf16(gate_up, 2 * s.intermediate, act, rows, s.intermediate);
  if (linear(l.down, act, s.intermediate, out, rows) != 0) return -1;
  radixserve_add_bf16(hidden, h, out, h, out, h, rows, h);
  return 0;
}

}  // extern "C"
