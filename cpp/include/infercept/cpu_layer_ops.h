#pragma once
// The small per-layer operations of a Llama decoder step on the CPU, framework-free: the RMS
// norm (with the residual add fused in, as vLLM's fused_add_rms_norm) and the rotary embedding
// of the new query and key heads fused with the write of their K/V into the paged cache.
//
// Why native: at decode each is a few thousand floats, so torch's per-op dispatch dominated:
// F.rms_norm is six ops, rotate-half RoPE seven, the KV write two index_copy_ calls, and a layer
// ran ~30 torch ops around its four GEMMs and its attention. One call each here replaces them.
//
// Two layers (STYLE.md §3), as cpu_attention.h: the functions over raw float32 pointers are the
// bottom one (C++ tests call them); the overloads over TensorViews check every tensor's device,
// dtype, shape and layout, throw InvalidArgumentError naming it, then call the bottom one.
#include <cstdint>

#include "infercept/tensor_view.h"

namespace infercept {

/// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight, for r < num_rows; rows of
/// `hidden` floats, dense. out may equal x (in place). The mean is accumulated in float32,
/// the arithmetic of torch's float32 rms_norm up to the order of the sum.
void rms_norm(float* out, const float* x, const float* weight, int64_t num_rows, int64_t hidden,
              float eps);

/// The pre-norm residual step: residual += x, then x = rms_norm(residual) * weight, both in
/// place ([num_rows, hidden] each, dense, disjoint). After it `residual` is the stream the next
/// block adds to and `x` its normalized input.
void add_rms_norm(float* x, float* residual, const float* weight, int64_t num_rows,
                  int64_t hidden, float eps);

/// The SwiGLU activation in the output of a stacked gate/up GEMM, in place: for every row r of
/// `gate_up` [num_rows, 2 * intermediate] (dense) and i < intermediate,
///   gate_up[r, i] = silu(gate_up[r, i]) * gate_up[r, intermediate + i],  silu(g) = g / (1 + e^-g)
/// and the up half is left as it was, so the down projection reads the gate half through the row
/// stride 2 * intermediate. e^-g is a polynomial (Cody-Waite reduction, Cephes' degree-6 fit:
/// within 2 ulp of expf) written so -O3 vectorises it on any target; torch's silu differs from it
/// by float rounding only (~1e-7 relative). The loop is compiled once per SIMD width (`body`;
/// kAuto: the widest the CPU has) from the same source without contraction, so every body gives
/// the same bits. Rows split over two or more threads from 8192 columns in all.
enum class SiluBody : uint8_t { kAuto, kBaseline, kAvx2, kAvx512 };
void silu_mul(float* gate_up, int64_t num_rows, int64_t intermediate, SiluBody body = SiluBody::kAuto);
/// Whether the running CPU can run `body` (kAuto and kBaseline: always).
bool silu_body_available(SiluBody body);

/// One step's new tokens through RoPE and into the cache. Every array dense, row-major:
///   qkv          [num_tokens, num_heads + 2 * num_kv_heads, head_dim]  query, key, value heads
///                 of each token in that order; the query and key heads are rotated in place
///   cos, sin     [num_tokens, head_dim]  per token, rotate-half layout (both halves equal)
///   key_cache    [num_slots, num_kv_heads, head_dim]  (the paged cache viewed by slot)
///   value_cache  [num_slots, num_kv_heads, head_dim]
///   slot_mapping [num_tokens]  int64 slot of each token, in [0, num_slots)
/// Rotation as HF Llama: y[i] = x[i] cos[i] - x[i + D/2] sin[i] and y[i + D/2] = x[i + D/2]
/// cos[i + D/2] + x[i] sin[i + D/2] for i < D/2 (head_dim D even); the rotated keys and the
/// values are then copied to their slots.
struct RotaryCacheWrite {
  float* qkv = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  float* key_cache = nullptr;
  float* value_cache = nullptr;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t num_slots = 0;
};

/// Throws InvalidArgumentError, naming the value and its limit, unless the sizes are positive
/// (num_tokens may be 0), head_dim is even and every slot is in [0, num_slots).
void check_rotary_write(const RotaryCacheWrite& write);

/// check_rotary_write, then applies RotaryCacheWrite. On a throw nothing is written.
void rotary_write_kv(const RotaryCacheWrite& write);

/// Adapters. rms_norm: `x` and `out` [num_rows, hidden] float32 CPU contiguous (out may be x),
/// `weight` [hidden]. add_rms_norm: `x` and `residual` [num_rows, hidden], disjoint.
void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps);
void add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                  float eps);

/// Adapter of silu_mul: `gate_up` [num_rows, 2 * intermediate] float32 CPU contiguous.
void silu_mul(const TensorView& gate_up);

/// Adapter of rotary_write_kv: `qkv` [num_tokens, num_heads + 2 * num_kv_heads, head_dim],
/// `cos`/`sin` [num_tokens, head_dim], caches [num_blocks, block_size, num_kv_heads, head_dim]
/// (float32, CPU, contiguous), `slot_mapping` [num_tokens] int64; num_heads is read off qkv
/// and the caches' num_kv_heads.
void rotary_write_kv(const TensorView& qkv, const TensorView& cos, const TensorView& sin,
                     const TensorView& key_cache, const TensorView& value_cache,
                     const TensorView& slot_mapping);

}  // namespace infercept
