#include "infercept/cpu_decoder_layer.h"

#include <algorithm>
#include <string>

#include "infercept/cpu_attention.h"
#include "infercept/cpu_layer_ops.h"
#include "infercept/cpu_linear.h"
#include "infercept/errors.h"

namespace infercept {
namespace {

constexpr char kLayer[] = "CpuDecoderLayer";
constexpr char kBatch[] = "cpu_decode_batch";
const Device kCpu{DeviceType::kCpu, 0};

// out[rows, out_features] = x W^T (+ bias), x's rows x_row_stride floats apart.
void linear(float* out, const float* x, int64_t x_row_stride, const float* packed,
            const float* bias, int64_t rows, int64_t in_features, int64_t out_features) {
  LinearProblem p;
  p.out = out;
  p.x = x;
  p.packed_weight = packed;
  p.bias = bias;
  p.num_rows = rows;
  p.in_features = in_features;
  p.out_features = out_features;
  p.x_row_stride = x_row_stride;
  p.out_row_stride = out_features;
  cpu_linear(p);
}

void check_packed(const char* name, const TensorView& packed, int64_t out_features,
                  int64_t in_features) {
  check_tensor(kLayer, name, packed, ScalarType::kFloat32, kCpu,
               {linear_num_panels(out_features), in_features, kLinearPanelWidth});
}

}  // namespace

void CpuDecoderScratch::reserve(const CpuDecoderLayerWeights& w, int64_t num_seqs) {
  const int64_t q = w.num_heads * w.head_dim;
  const auto grow = [num_seqs](std::vector<float>& buffer, int64_t row) {
    const auto size = static_cast<size_t>(num_seqs * row);
    if (buffer.size() < size) buffer.resize(size);
  };
  grow(qkv_, q + 2 * w.num_kv_heads * w.head_dim);
  grow(query_, q);
  grow(attention_, q);
  grow(gate_up_, 2 * w.intermediate);
}

void cpu_decoder_layer_pre_attention(const CpuDecoderLayerWeights& w, const CpuLayerCache& cache,
                                     const CpuTokenBatch& t, float* qkv) {
  const int64_t n = t.num_tokens;
  if (n == 0) return;
  const int64_t qkv_width = (w.num_heads + 2 * w.num_kv_heads) * w.head_dim;
  RotaryCacheWrite rotary;
  rotary.qkv = qkv;
  rotary.cos = t.cos;
  rotary.sin = t.sin;
  rotary.key_cache = cache.key_cache;
  rotary.value_cache = cache.value_cache;
  rotary.slot_mapping = t.slot_mapping;
  rotary.num_tokens = n;
  rotary.num_heads = w.num_heads;
  rotary.num_kv_heads = w.num_kv_heads;
  rotary.head_dim = w.head_dim;
  rotary.num_slots = cache.num_blocks * cache.block_size;
  check_rotary_write(rotary);  // before x and residual change
  add_rms_norm(t.x, t.residual, w.input_norm, n, w.hidden, w.eps);
  linear(qkv, t.x, w.hidden, w.qkv_packed, w.qkv_bias, n, w.hidden, qkv_width);
  rotary_write_kv(rotary);
}

void cpu_decoder_layer_post_attention(const CpuDecoderLayerWeights& w, const CpuTokenBatch& t,
                                      const float* attention, int64_t attention_row_stride,
                                      CpuDecoderScratch& scratch) {
  const int64_t n = t.num_tokens;
  if (n == 0) return;
  scratch.reserve(w, n);
  const int64_t q_width = w.num_heads * w.head_dim;
  linear(t.x, attention, attention_row_stride, w.o_packed, nullptr, n, q_width, w.hidden);
  add_rms_norm(t.x, t.residual, w.post_norm, n, w.hidden, w.eps);
  float* gate_up = scratch.gate_up();
  linear(gate_up, t.x, w.hidden, w.gate_up_packed, nullptr, n, w.hidden, 2 * w.intermediate);
  silu_mul(gate_up, n, w.intermediate);
  // The gate half, read through the row stride of both halves.
  linear(t.x, gate_up, 2 * w.intermediate, w.down_packed, nullptr, n, w.intermediate, w.hidden);
}

void cpu_decoder_layer_decode(const CpuDecoderLayerWeights& w, const CpuLayerCache& cache,
                              const CpuDecodeBatch& b, CpuDecoderScratch& scratch) {
  const int64_t n = b.tokens.num_tokens;
  if (n == 0) return;
  scratch.reserve(w, n);
  const int64_t q_width = w.num_heads * w.head_dim;
  const int64_t qkv_width = q_width + 2 * w.num_kv_heads * w.head_dim;
  float* qkv = scratch.qkv();
  cpu_decoder_layer_pre_attention(w, cache, b.tokens, qkv);
  // The kernel takes dense queries; in qkv each token's query heads are followed by its K/V.
  float* query = scratch.query();
  for (int64_t s = 0; s < n; ++s) {
    std::copy_n(qkv + s * qkv_width, q_width, query + s * q_width);
  }
  PagedDecodeProblem attention;
  attention.out = scratch.attention();
  attention.query = query;
  attention.key_cache = cache.key_cache;
  attention.value_cache = cache.value_cache;
  attention.block_tables = b.block_tables;
  attention.context_lens = b.context_lens;
  attention.num_seqs = n;
  attention.num_heads = w.num_heads;
  attention.num_kv_heads = w.num_kv_heads;
  attention.head_dim = w.head_dim;
  attention.block_size = cache.block_size;
  attention.max_blocks = b.max_blocks;
  attention.num_blocks = cache.num_blocks;
  attention.scale = b.scale;
  paged_decode_attention(attention);
  cpu_decoder_layer_post_attention(w, b.tokens, scratch.attention(), q_width, scratch);
}

CpuDecoderLayer::CpuDecoderLayer(const TensorView& input_norm, const TensorView& qkv_packed,
                                 const TensorView* qkv_bias, const TensorView& o_packed,
                                 const TensorView& post_norm, const TensorView& gate_up_packed,
                                 const TensorView& down_packed, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, float eps) {
  check_positive(kLayer, "num_heads", num_heads);
  check_positive(kLayer, "num_kv_heads", num_kv_heads);
  check_positive(kLayer, "head_dim", head_dim);
  if (num_heads % num_kv_heads != 0) {
    throw_invalid_argument(kLayer, "num_heads=" + std::to_string(num_heads) + " must be a multiple of num_kv_heads=" +
                     std::to_string(num_kv_heads));
  }
  check_ndim(kLayer, "input_norm", input_norm, 1, "[hidden]");
  check_ndim(kLayer, "gate_up_packed", gate_up_packed, 3, "[num_panels, hidden, 16]");
  check_ndim(kLayer, "down_packed", down_packed, 3, "[num_panels, intermediate, 16]");
  const int64_t hidden = input_norm.shape[0];
  // The packed layouts drop the output count; the down projection's input count is I.
  const int64_t intermediate = down_packed.shape[1];
  const int64_t q_width = num_heads * head_dim;
  const int64_t qkv_width = q_width + 2 * num_kv_heads * head_dim;
  check_tensor(kLayer, "input_norm", input_norm, ScalarType::kFloat32, kCpu, {hidden});
  check_tensor(kLayer, "post_norm", post_norm, ScalarType::kFloat32, kCpu, {hidden});
  check_packed("qkv_packed", qkv_packed, qkv_width, hidden);
  check_packed("o_packed", o_packed, hidden, q_width);
  check_packed("gate_up_packed", gate_up_packed, 2 * intermediate, hidden);
  check_packed("down_packed", down_packed, hidden, intermediate);
  if (qkv_bias != nullptr) {
    check_tensor(kLayer, "qkv_bias", *qkv_bias, ScalarType::kFloat32, kCpu, {qkv_width});
    weights_.qkv_bias = qkv_bias->data_as<const float>();
  }
  weights_.input_norm = input_norm.data_as<const float>();
  weights_.qkv_packed = qkv_packed.data_as<const float>();
  weights_.o_packed = o_packed.data_as<const float>();
  weights_.post_norm = post_norm.data_as<const float>();
  weights_.gate_up_packed = gate_up_packed.data_as<const float>();
  weights_.down_packed = down_packed.data_as<const float>();
  weights_.hidden = hidden;
  weights_.num_heads = num_heads;
  weights_.num_kv_heads = num_kv_heads;
  weights_.head_dim = head_dim;
  weights_.intermediate = intermediate;
  weights_.eps = eps;
}

CpuLayerCache CpuDecoderLayer::check_cache(const CpuTokenBatch& tokens,
                                           const TensorView& key_cache,
                                           const TensorView& value_cache) const {
  const CpuDecoderLayerWeights& w = weights_;
  if (tokens.hidden != w.hidden || tokens.head_dim != w.head_dim) {
    throw_invalid_argument(kLayer, "the batch has hidden=" + std::to_string(tokens.hidden) +
                                       " and head_dim=" + std::to_string(tokens.head_dim) +
                                       ", the layer hidden=" + std::to_string(w.hidden) +
                                       " and head_dim=" + std::to_string(w.head_dim));
  }
  check_ndim(kLayer, "key_cache", key_cache, 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  const int64_t blocks = key_cache.shape[0], block_size = key_cache.shape[1];
  check_tensor(kLayer, "key_cache", key_cache, ScalarType::kFloat32, kCpu,
               {blocks, block_size, w.num_kv_heads, w.head_dim});
  check_tensor(kLayer, "value_cache", value_cache, ScalarType::kFloat32, kCpu,
               {blocks, block_size, w.num_kv_heads, w.head_dim});
  check_disjoint(kLayer, "key_cache", key_cache, "value_cache", value_cache);
  CpuLayerCache cache;
  cache.key_cache = key_cache.data_as<float>();
  cache.value_cache = value_cache.data_as<float>();
  cache.num_blocks = blocks;
  cache.block_size = block_size;
  return cache;
}

void CpuDecoderLayer::decode(const CpuDecodeBatch& batch, const TensorView& key_cache,
                             const TensorView& value_cache, CpuDecoderScratch& scratch) const {
  const CpuLayerCache cache = check_cache(batch.tokens, key_cache, value_cache);
  cpu_decoder_layer_decode(weights_, cache, batch, scratch);
}

void CpuDecoderLayer::pre_attention(const CpuTokenBatch& tokens, const TensorView& key_cache,
                                    const TensorView& value_cache, const TensorView& qkv) const {
  const CpuLayerCache cache = check_cache(tokens, key_cache, value_cache);
  const CpuDecoderLayerWeights& w = weights_;
  check_tensor(kLayer, "qkv", qkv, ScalarType::kFloat32, kCpu,
               {tokens.num_tokens, w.num_heads + 2 * w.num_kv_heads, w.head_dim});
  check_disjoint(kLayer, "key_cache", key_cache, "qkv", qkv);
  check_disjoint(kLayer, "value_cache", value_cache, "qkv", qkv);
  cpu_decoder_layer_pre_attention(w, cache, tokens, qkv.data_as<float>());
}

void CpuDecoderLayer::post_attention(const CpuTokenBatch& tokens, const TensorView& attention,
                                     CpuDecoderScratch& scratch) const {
  const CpuDecoderLayerWeights& w = weights_;
  const int64_t q_width = w.num_heads * w.head_dim;
  check_ndim(kLayer, "attention", attention, 2, "[num_tokens, num_heads * head_dim]");
  if (attention.dtype != ScalarType::kFloat32 || attention.device != kCpu ||
      attention.shape[0] != tokens.num_tokens || attention.shape[1] != q_width ||
      (q_width > 1 && attention.strides[1] != 1) ||
      (tokens.num_tokens > 1 && attention.strides[0] < q_width)) {
    throw_invalid_argument(kLayer, "attention must be float32 on the cpu, [" +
                                       std::to_string(tokens.num_tokens) + ", " +
                                       std::to_string(q_width) + "] with contiguous rows");
  }
  const int64_t row_stride = tokens.num_tokens > 1 ? attention.strides[0] : q_width;
  cpu_decoder_layer_post_attention(w, tokens, attention.data_as<const float>(), row_stride,
                                   scratch);
}

CpuTokenBatch make_cpu_token_batch(const TensorView& x, const TensorView& residual,
                                   const TensorView& cos, const TensorView& sin,
                                   const TensorView& slot_mapping) {
  check_ndim(kBatch, "x", x, 2, "[num_tokens, hidden]");
  check_ndim(kBatch, "cos", cos, 2, "[num_tokens, head_dim]");
  const int64_t n = x.shape[0], hidden = x.shape[1], d = cos.shape[1];
  check_tensor(kBatch, "x", x, ScalarType::kFloat32, kCpu, {n, hidden});
  check_tensor(kBatch, "residual", residual, ScalarType::kFloat32, kCpu, {n, hidden});
  check_tensor(kBatch, "cos", cos, ScalarType::kFloat32, kCpu, {n, d});
  check_tensor(kBatch, "sin", sin, ScalarType::kFloat32, kCpu, {n, d});
  check_tensor(kBatch, "slot_mapping", slot_mapping, ScalarType::kInt64, kCpu, {n});
  check_disjoint(kBatch, "x", x, "residual", residual);
  CpuTokenBatch t;
  t.x = x.data_as<float>();
  t.residual = residual.data_as<float>();
  t.cos = cos.data_as<const float>();
  t.sin = sin.data_as<const float>();
  t.slot_mapping = slot_mapping.data_as<const int64_t>();
  t.num_tokens = n;
  t.hidden = hidden;
  t.head_dim = d;
  return t;
}

CpuDecodeBatch make_cpu_decode_batch(const TensorView& x, const TensorView& residual,
                                     const TensorView& cos, const TensorView& sin,
                                     const TensorView& slot_mapping,
                                     const TensorView& block_tables,
                                     const TensorView& context_lens, float scale) {
  CpuDecodeBatch b;
  b.tokens = make_cpu_token_batch(x, residual, cos, sin, slot_mapping);
  const int64_t n = b.tokens.num_tokens;
  check_ndim(kBatch, "block_tables", block_tables, 2, "[num_seqs, max_blocks]");
  const int64_t max_blocks = block_tables.shape[1];
  check_tensor(kBatch, "block_tables", block_tables, ScalarType::kInt32, kCpu, {n, max_blocks});
  check_tensor(kBatch, "context_lens", context_lens, ScalarType::kInt32, kCpu, {n});
  b.block_tables = block_tables.data_as<const int32_t>();
  b.context_lens = context_lens.data_as<const int32_t>();
  b.max_blocks = max_blocks;
  b.scale = scale;
  return b;
}

}  // namespace infercept
