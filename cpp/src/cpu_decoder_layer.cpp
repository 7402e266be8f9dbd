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

void cpu_decoder_layer_decode(const CpuDecoderLayerWeights& w, const CpuLayerCache& cache,
                              const CpuDecodeBatch& b, CpuDecoderScratch& scratch) {
  const int64_t n = b.num_seqs;
  if (n == 0) return;
  scratch.reserve(w, n);
  const int64_t hidden = w.hidden, d = w.head_dim;
  const int64_t q_width = w.num_heads * d;
  const int64_t qkv_width = q_width + 2 * w.num_kv_heads * d;

  add_rms_norm(b.x, b.residual, w.input_norm, n, hidden, w.eps);
  float* qkv = scratch.qkv();
  linear(qkv, b.x, hidden, w.qkv_packed, w.qkv_bias, n, hidden, qkv_width);

  RotaryCacheWrite rotary;
  rotary.qkv = qkv;
  rotary.cos = b.cos;
  rotary.sin = b.sin;
  rotary.key_cache = cache.key_cache;
  rotary.value_cache = cache.value_cache;
  rotary.slot_mapping = b.slot_mapping;
  rotary.num_tokens = n;
  rotary.num_heads = w.num_heads;
  rotary.num_kv_heads = w.num_kv_heads;
  rotary.head_dim = d;
  rotary.num_slots = cache.num_blocks * cache.block_size;
  rotary_write_kv(rotary);

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
  attention.head_dim = d;
  attention.block_size = cache.block_size;
  attention.max_blocks = b.max_blocks;
  attention.num_blocks = cache.num_blocks;
  attention.scale = b.scale;
  paged_decode_attention(attention);

  linear(b.x, scratch.attention(), q_width, w.o_packed, nullptr, n, q_width, hidden);
  add_rms_norm(b.x, b.residual, w.post_norm, n, hidden, w.eps);
  float* gate_up = scratch.gate_up();
  linear(gate_up, b.x, hidden, w.gate_up_packed, nullptr, n, hidden, 2 * w.intermediate);
  silu_mul(gate_up, n, w.intermediate);
  // The gate half, read through the row stride of both halves.
  linear(b.x, gate_up, 2 * w.intermediate, w.down_packed, nullptr, n, w.intermediate, hidden);
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

void CpuDecoderLayer::decode(const CpuDecodeBatch& batch, const TensorView& key_cache,
                             const TensorView& value_cache, CpuDecoderScratch& scratch) const {
  const CpuDecoderLayerWeights& w = weights_;
  if (batch.hidden != w.hidden || batch.head_dim != w.head_dim) {
    throw_invalid_argument(kLayer, "the batch has hidden=" + std::to_string(batch.hidden) + " and head_dim=" +
                     std::to_string(batch.head_dim) + ", the layer hidden=" +
                     std::to_string(w.hidden) + " and head_dim=" + std::to_string(w.head_dim));
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
  cpu_decoder_layer_decode(w, cache, batch, scratch);
}

CpuDecodeBatch make_cpu_decode_batch(const TensorView& x, const TensorView& residual,
                                     const TensorView& cos, const TensorView& sin,
                                     const TensorView& slot_mapping,
                                     const TensorView& block_tables,
                                     const TensorView& context_lens, float scale) {
  check_ndim(kBatch, "x", x, 2, "[num_seqs, hidden]");
  check_ndim(kBatch, "cos", cos, 2, "[num_seqs, head_dim]");
  check_ndim(kBatch, "block_tables", block_tables, 2, "[num_seqs, max_blocks]");
  const int64_t n = x.shape[0], hidden = x.shape[1], d = cos.shape[1];
  const int64_t max_blocks = block_tables.shape[1];
  check_tensor(kBatch, "x", x, ScalarType::kFloat32, kCpu, {n, hidden});
  check_tensor(kBatch, "residual", residual, ScalarType::kFloat32, kCpu, {n, hidden});
  check_tensor(kBatch, "cos", cos, ScalarType::kFloat32, kCpu, {n, d});
  check_tensor(kBatch, "sin", sin, ScalarType::kFloat32, kCpu, {n, d});
  check_tensor(kBatch, "slot_mapping", slot_mapping, ScalarType::kInt64, kCpu, {n});
  check_tensor(kBatch, "block_tables", block_tables, ScalarType::kInt32, kCpu, {n, max_blocks});
  check_tensor(kBatch, "context_lens", context_lens, ScalarType::kInt32, kCpu, {n});
  check_disjoint(kBatch, "x", x, "residual", residual);
  CpuDecodeBatch b;
  b.x = x.data_as<float>();
  b.residual = residual.data_as<float>();
  b.cos = cos.data_as<const float>();
  b.sin = sin.data_as<const float>();
  b.slot_mapping = slot_mapping.data_as<const int64_t>();
  b.block_tables = block_tables.data_as<const int32_t>();
  b.context_lens = context_lens.data_as<const int32_t>();
  b.num_seqs = n;
  b.hidden = hidden;
  b.head_dim = d;
  b.max_blocks = max_blocks;
  b.scale = scale;
  return b;
}

}  // namespace infercept
