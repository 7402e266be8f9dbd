#pragma once
// One Llama decoder layer of a decode step on the CPU as a single call: the pre-norm residual
// adds, the four packed GEMMs (cpu_linear.h), RoPE with the KV write and the SwiGLU gate
// (cpu_layer_ops.h), and paged decode attention (cpu_attention.h), in that order, over scratch
// buffers that live from step to step.
//
// Why one call: at batch 1 each of a layer's ~10 operations runs for 5-200 us, and the Python
// between them (a module call, the dispatch checks, a DLPack export per tensor, a fresh output
// tensor) cost about as much again. The layer runs exactly the operations the per-op torch path
// runs, on the same bodies, so its output is bit-equal to that path's (tests compare them).
//
// Two layers (STYLE.md §3): CpuDecoderLayerWeights, CpuDecodeBatch and CpuLayerCache over raw
// pointers with cpu_decoder_layer_decode are the bottom one; CpuDecoderLayer and
// make_cpu_decode_batch over TensorViews are the adapter the binding calls, which checks the
// weights once when a layer is built and each step's tensors once per step.
#include <cstdint>
#include <vector>

#include "infercept/tensor_view.h"

namespace infercept {

/// A layer's weights: the norms' gains and the GEMM weights packed by pack_linear_weight.
/// Q = num_heads * head_dim, KV = num_kv_heads * head_dim, I = intermediate.
///   input_norm      [hidden]
///   qkv_packed      packed [Q + 2 KV, hidden]   rows: the query heads, then keys, then values
///   qkv_bias        [Q + 2 KV] or null
///   o_packed        packed [hidden, Q]
///   post_norm       [hidden]
///   gate_up_packed  packed [2 I, hidden]       rows: gate_proj's, then up_proj's
///   down_packed     packed [hidden, I]
struct CpuDecoderLayerWeights {
  const float* input_norm = nullptr;
  const float* qkv_packed = nullptr;
  const float* qkv_bias = nullptr;
  const float* o_packed = nullptr;
  const float* post_norm = nullptr;
  const float* gate_up_packed = nullptr;
  const float* down_packed = nullptr;
  int64_t hidden = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t intermediate = 0;
  float eps = 1e-5f;
};

/// One decode step's batch, shared by every layer: one new token per sequence.
///   x             [num_seqs, hidden]  in: the previous layer's output (the embeddings before
///                                     the first layer); out: this layer's MLP output
///   residual      [num_seqs, hidden]  the residual stream before x (zeros before the first
///                                     layer: 0 + x is x exactly); out: the stream before x
///   cos, sin      [num_seqs, head_dim] rotate-half RoPE of each token's position
///   slot_mapping  [num_seqs] int64    cache slot of each new token
///   block_tables  [num_seqs, max_blocks] int32, context_lens [num_seqs] int32: as
///                 PagedDecodeProblem, the context including the new token
struct CpuDecodeBatch {
  float* x = nullptr;
  float* residual = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int64_t* slot_mapping = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* context_lens = nullptr;
  int64_t num_seqs = 0;
  int64_t hidden = 0;
  int64_t head_dim = 0;
  int64_t max_blocks = 0;
  float scale = 1.0f;  ///< Softmax scale, usually head_dim ** -0.5.
};

/// A layer's paged caches, [num_blocks, block_size, num_kv_heads, head_dim] float32 each.
struct CpuLayerCache {
  float* key_cache = nullptr;
  float* value_cache = nullptr;
  int64_t num_blocks = 0;
  int64_t block_size = 0;
};

/// Buffers for a layer's intermediate activations, grown on demand and reused by every layer
/// and step: fresh buffers this large would be mapped anew (and page-faulted in) each time.
class CpuDecoderScratch {
 public:
  /// Sized for num_seqs rows of `weights`' shapes; grows only.
  void reserve(const CpuDecoderLayerWeights& weights, int64_t num_seqs);
  float* qkv() { return qkv_.data(); }                    ///< [num_seqs, Q + 2 KV]
  float* query() { return query_.data(); }                ///< [num_seqs, Q] dense
  float* attention() { return attention_.data(); }        ///< [num_seqs, Q]
  float* gate_up() { return gate_up_.data(); }            ///< [num_seqs, 2 I]

 private:
  std::vector<float> qkv_, query_, attention_, gate_up_;
};

/// Runs one layer on `batch` in place (x and residual as CpuDecodeBatch says), writing the new
/// tokens' K/V into `cache`:
///   residual += x; x = rms_norm(residual) * input_norm
///   qkv = x Wqkv^T + b; RoPE on q, k in place; k, v -> their slots
///   attention = paged_decode_attention(q over the cache)
///   x = attention Wo^T; residual += x; x = rms_norm(residual) * post_norm
///   gate_up = x Wgu^T; gate = silu(gate) * up; x = gate Wdown^T
/// Throws InvalidArgumentError from the parts' checks (a slot, context length or block id out
/// of range); the write into the cache and x may then have happened in part.
void cpu_decoder_layer_decode(const CpuDecoderLayerWeights& weights, const CpuLayerCache& cache,
                              const CpuDecodeBatch& batch, CpuDecoderScratch& scratch);

/// The adapter of a layer: checks the weights once (float32, CPU, contiguous, shapes as in
/// CpuDecoderLayerWeights for the given head counts), then holds their pointers. The tensors
/// must outlive it (the binding keeps them).
class CpuDecoderLayer {
 public:
  CpuDecoderLayer(const TensorView& input_norm, const TensorView& qkv_packed,
                  const TensorView* qkv_bias, const TensorView& o_packed,
                  const TensorView& post_norm, const TensorView& gate_up_packed,
                  const TensorView& down_packed, int64_t num_heads, int64_t num_kv_heads,
                  int64_t head_dim, float eps);

  /// Checks `key_cache` and `value_cache` against the layer and `batch`, then runs
  /// cpu_decoder_layer_decode. Throws InvalidArgumentError naming a bad tensor.
  void decode(const CpuDecodeBatch& batch, const TensorView& key_cache,
              const TensorView& value_cache, CpuDecoderScratch& scratch) const;

  const CpuDecoderLayerWeights& weights() const { return weights_; }

 private:
  CpuDecoderLayerWeights weights_;
};

/// The adapter of a step's batch: `x` and `residual` [num_seqs, hidden], `cos`/`sin`
/// [num_seqs, head_dim] float32; `slot_mapping` [num_seqs] int64; `block_tables` [num_seqs,
/// max_blocks] and `context_lens` [num_seqs] int32; all CPU and contiguous, x and residual
/// disjoint. Throws InvalidArgumentError naming a bad tensor.
CpuDecodeBatch make_cpu_decode_batch(const TensorView& x, const TensorView& residual,
                                     const TensorView& cos, const TensorView& sin,
                                     const TensorView& slot_mapping,
                                     const TensorView& block_tables,
                                     const TensorView& context_lens, float scale);

}  // namespace infercept
