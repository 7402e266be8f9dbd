#pragma once
// One Llama decoder layer of a step on the CPU as a single call: the pre-norm residual
// adds, the four packed GEMMs (cpu_linear.h), RoPE with the KV write and the SwiGLU gate
// (cpu_layer_ops.h), and paged decode attention (cpu_attention.h), in that order, over scratch
// buffers that live from step to step.
//
// Why one call: at batch 1 each of a layer's ~10 operations runs for 5-200 us, and the Python
// between them (a module call, the dispatch checks, a DLPack export per tensor, a fresh output
// tensor) cost about as much again. The layer runs exactly the operations the per-op torch path
// runs, on the same bodies, so its output is bit-equal to that path's (tests compare them).
//
// The attention's rows are the step's tokens, each over its own sequence's cache prefix up to
// and including itself: a decode token, or a token of a prefill or recompute chunk (whose KV the
// pre-attention part has just written, so the context length makes the chunk causal). The two
// parts are also bound separately, for a step whose attention runs in torch.
//
// Two layers (STYLE.md §3): the structs over raw pointers with the cpu_decoder_layer_*
// functions are the bottom one; CpuDecoderLayer and make_cpu_*_batch over TensorViews are the
// adapter the binding calls, which checks the weights once when a layer is built and each
// step's tensors once per step.
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

/// One step's new tokens, shared by every layer (T tokens of any sequences, in any step):
///   x             [num_tokens, hidden]  in: the previous layer's output (the embeddings before
///                                       the first layer); out: this layer's MLP output
///   residual      [num_tokens, hidden]  the residual stream before x (zeros before the first
///                                       layer: 0 + x is x exactly); out: the stream before x
///   cos, sin      [num_tokens, head_dim] rotate-half RoPE of each token's position
///   slot_mapping  [num_tokens] int64    cache slot of each token
struct CpuTokenBatch {
  float* x = nullptr;
  float* residual = nullptr;
  const float* cos = nullptr;
  const float* sin = nullptr;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int64_t head_dim = 0;
};

/// A step's tokens with what the attention reads, one row per token: block_tables
/// [num_tokens, max_blocks] int32 (the row's sequence's table) and context_lens [num_tokens]
/// int32 (the row's position + 1) as PagedDecodeProblem. On a decode-only step the rows are the
/// sequences and their tables.
struct CpuDecodeBatch {
  CpuTokenBatch tokens;
  const int32_t* block_tables = nullptr;
  const int32_t* context_lens = nullptr;
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

/// The layer before its attention, for any tokens (prefill and recompute chunks too), in place
/// on x and residual:
///   residual += x; x = rms_norm(residual) * input_norm
///   qkv = x Wqkv^T + b; RoPE on q, k in place; k, v -> their slots of `cache`
/// `qkv` [num_tokens, Q + 2 KV] is written: each token's rotated query heads, keys, values.
/// Throws InvalidArgumentError for a slot out of range, before anything is written.
void cpu_decoder_layer_pre_attention(const CpuDecoderLayerWeights& weights,
                                     const CpuLayerCache& cache, const CpuTokenBatch& tokens,
                                     float* qkv);

/// The layer after its attention, in place on x and residual; `attention` [num_tokens, Q]
/// (rows attention_row_stride floats apart) is the attention's output:
///   x = attention Wo^T; residual += x; x = rms_norm(residual) * post_norm
///   gate_up = x Wgu^T; gate = silu(gate) * up; x = gate Wdown^T
void cpu_decoder_layer_post_attention(const CpuDecoderLayerWeights& weights,
                                      const CpuTokenBatch& tokens, const float* attention,
                                      int64_t attention_row_stride, CpuDecoderScratch& scratch);

/// A whole layer on a step: pre-attention, paged attention of every row over the cache,
/// post-attention. Throws InvalidArgumentError from the parts' checks (a slot, context length
/// or block id out of range); the write into the cache and x may then have happened in part.
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

  /// Checks the caches and `qkv` [num_tokens, num_heads + 2 * num_kv_heads, head_dim] float32
  /// CPU contiguous, then runs cpu_decoder_layer_pre_attention.
  void pre_attention(const CpuTokenBatch& tokens, const TensorView& key_cache,
                     const TensorView& value_cache, const TensorView& qkv) const;

  /// Checks `attention` [num_tokens, num_heads * head_dim] float32 CPU with contiguous rows,
  /// then runs cpu_decoder_layer_post_attention.
  void post_attention(const CpuTokenBatch& tokens, const TensorView& attention,
                      CpuDecoderScratch& scratch) const;

  const CpuDecoderLayerWeights& weights() const { return weights_; }

 private:
  // The caches' views, checked against the layer's heads and the batch's sizes.
  CpuLayerCache check_cache(const CpuTokenBatch& tokens, const TensorView& key_cache,
                            const TensorView& value_cache) const;

  CpuDecoderLayerWeights weights_;
};

/// The adapter of a step's tokens: `x` and `residual` [num_tokens, hidden], `cos`/`sin`
/// [num_tokens, head_dim] float32; `slot_mapping` [num_tokens] int64; all CPU and contiguous,
/// x and residual disjoint. Throws InvalidArgumentError naming a bad tensor.
CpuTokenBatch make_cpu_token_batch(const TensorView& x, const TensorView& residual,
                                   const TensorView& cos, const TensorView& sin,
                                   const TensorView& slot_mapping);

/// The adapter of a step: the tokens as make_cpu_token_batch, `block_tables`
/// [num_tokens, max_blocks] and `context_lens` [num_tokens] int32 (one row per token), CPU,
/// contiguous.
CpuDecodeBatch make_cpu_decode_batch(const TensorView& x, const TensorView& residual,
                                     const TensorView& cos, const TensorView& sin,
                                     const TensorView& slot_mapping,
                                     const TensorView& block_tables,
                                     const TensorView& context_lens, float scale);

}  // namespace infercept
