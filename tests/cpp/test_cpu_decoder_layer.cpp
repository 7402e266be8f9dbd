// The native decode layer against a plain double-precision reference of the same Llama layer
// (norms, GEMMs, RoPE, paged attention over a cached context, SwiGLU), and its adapters' checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "infercept/cpu_decoder_layer.h"
#include "infercept/cpu_linear.h"
#include "infercept/errors.h"

namespace infercept {
namespace {

constexpr int64_t kHidden = 32, kHeads = 4, kKvHeads = 2, kHeadDim = 8, kInter = 24;
constexpr int64_t kQ = kHeads * kHeadDim, kKv = kKvHeads * kHeadDim, kQkv = kQ + 2 * kKv;
constexpr int64_t kBlockSize = 4, kNumBlocks = 9;
constexpr float kEps = 1e-5f;

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<float> packed(const std::vector<float>& weight, int64_t out, int64_t in) {
  std::vector<float> p(linear_num_panels(out) * in * kLinearPanelWidth);
  pack_linear_weight(weight.data(), out, in, in, p.data());
  return p;
}

// y = W x, W [out, in] row-major.
std::vector<double> matvec(const std::vector<float>& w, const std::vector<double>& x, int64_t out) {
  const int64_t in = static_cast<int64_t>(x.size());
  std::vector<double> y(out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) y[o] += w[o * in + i] * x[i];
  }
  return y;
}

std::vector<double> norm(const std::vector<double>& x, const std::vector<float>& weight) {
  double sum = 0.0;
  for (double v : x) sum += v * v;
  const double inv = 1.0 / std::sqrt(sum / x.size() + kEps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * weight[i];
  return y;
}

struct Layer {
  std::vector<float> input_norm = random_floats(kHidden, 1, 0.2f);
  std::vector<float> post_norm = random_floats(kHidden, 2, 0.2f);
  std::vector<float> qkv = random_floats(kQkv * kHidden, 3, 0.2f);
  std::vector<float> bias = random_floats(kQkv, 4, 0.1f);
  std::vector<float> o = random_floats(kHidden * kQ, 5, 0.2f);
  std::vector<float> gate_up = random_floats(2 * kInter * kHidden, 6, 0.2f);
  std::vector<float> down = random_floats(kHidden * kInter, 7, 0.2f);
  std::vector<float> qkv_p, o_p, gate_up_p, down_p;
  CpuDecoderLayerWeights weights;

  Layer() {
    for (float& g : input_norm) g += 1.0f;
    for (float& g : post_norm) g += 1.0f;
    qkv_p = packed(qkv, kQkv, kHidden);
    o_p = packed(o, kHidden, kQ);
    gate_up_p = packed(gate_up, 2 * kInter, kHidden);
    down_p = packed(down, kHidden, kInter);
    weights.input_norm = input_norm.data();
    weights.qkv_packed = qkv_p.data();
    weights.qkv_bias = bias.data();
    weights.o_packed = o_p.data();
    weights.post_norm = post_norm.data();
    weights.gate_up_packed = gate_up_p.data();
    weights.down_packed = down_p.data();
    weights.hidden = kHidden;
    weights.num_heads = kHeads;
    weights.num_kv_heads = kKvHeads;
    weights.head_dim = kHeadDim;
    weights.intermediate = kInter;
    weights.eps = kEps;
  }
};

TEST(CpuDecoderLayer, MatchesADoublePrecisionReference) {
  const Layer layer;
  const std::vector<int32_t> context_lens = {5, 1, 9};
  const std::vector<int32_t> block_tables = {3, 7, 0,  //
                                             5, 0, 0,  //
                                             1, 2, 8};
  const int64_t num_seqs = 3, max_blocks = 3;
  const int64_t slot_floats = kKvHeads * kHeadDim;
  // A cached context of random K/V; the step writes each sequence's last token.
  std::vector<float> key_cache = random_floats(kNumBlocks * kBlockSize * slot_floats, 8);
  std::vector<float> value_cache = random_floats(kNumBlocks * kBlockSize * slot_floats, 9);
  std::vector<int64_t> slots(num_seqs);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t pos = context_lens[s] - 1;
    slots[s] = block_tables[s * max_blocks + pos / kBlockSize] * kBlockSize + pos % kBlockSize;
  }
  std::vector<float> x = random_floats(num_seqs * kHidden, 10);
  std::vector<float> residual = random_floats(num_seqs * kHidden, 11);
  std::vector<float> cos(num_seqs * kHeadDim), sin(num_seqs * kHeadDim);
  const auto angles = random_floats(num_seqs * kHeadDim / 2, 12, 3.0f);
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t i = 0; i < kHeadDim / 2; ++i) {
      const float a = angles[s * kHeadDim / 2 + i];
      cos[s * kHeadDim + i] = cos[s * kHeadDim + i + kHeadDim / 2] = std::cos(a);
      sin[s * kHeadDim + i] = sin[s * kHeadDim + i + kHeadDim / 2] = std::sin(a);
    }
  }
  const auto x0 = x, residual0 = residual, key0 = key_cache, value0 = value_cache;

  CpuDecodeBatch batch;
  batch.tokens.x = x.data();
  batch.tokens.residual = residual.data();
  batch.tokens.cos = cos.data();
  batch.tokens.sin = sin.data();
  batch.tokens.slot_mapping = slots.data();
  batch.tokens.num_tokens = num_seqs;
  batch.tokens.hidden = kHidden;
  batch.tokens.head_dim = kHeadDim;
  batch.block_tables = block_tables.data();
  batch.context_lens = context_lens.data();
  batch.max_blocks = max_blocks;
  batch.scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  CpuLayerCache cache{key_cache.data(), value_cache.data(), kNumBlocks, kBlockSize};
  CpuDecoderScratch scratch;
  cpu_decoder_layer_decode(layer.weights, cache, batch, scratch);

  for (int64_t s = 0; s < num_seqs; ++s) {
    std::vector<double> stream(kHidden);
    for (int64_t i = 0; i < kHidden; ++i) stream[i] = residual0[s * kHidden + i] + x0[s * kHidden + i];
    auto qkv = matvec(layer.qkv, norm(stream, layer.input_norm), kQkv);
    for (int64_t i = 0; i < kQkv; ++i) qkv[i] += layer.bias[i];
    for (int64_t h = 0; h < kHeads + kKvHeads; ++h) {  // rotate-half RoPE on q and k heads
      double* head = qkv.data() + h * kHeadDim;
      for (int64_t i = 0; i < kHeadDim / 2; ++i) {
        const double c = cos[s * kHeadDim + i], sn = sin[s * kHeadDim + i];
        const double lo = head[i], hi = head[i + kHeadDim / 2];
        head[i] = lo * c - hi * sn;
        head[i + kHeadDim / 2] = hi * c + lo * sn;
      }
    }
    for (int64_t i = 0; i < kKv; ++i) {  // the new token's K/V in its slot
      ASSERT_NEAR(key_cache[slots[s] * slot_floats + i], qkv[kQ + i], 1e-4);
      ASSERT_NEAR(value_cache[slots[s] * slot_floats + i], qkv[kQ + kKv + i], 1e-4);
    }
    std::vector<double> attention(kQ, 0.0);
    for (int64_t h = 0; h < kHeads; ++h) {
      const int64_t kv = h / (kHeads / kKvHeads);
      std::vector<double> scores(context_lens[s]);
      double top = -1e300;
      for (int32_t t = 0; t < context_lens[s]; ++t) {
        const int64_t slot = block_tables[s * max_blocks + t / kBlockSize] * kBlockSize + t % kBlockSize;
        const bool is_new = t == context_lens[s] - 1;
        double dot = 0.0;
        for (int64_t i = 0; i < kHeadDim; ++i) {
          const double k = is_new ? qkv[kQ + kv * kHeadDim + i] : key0[(slot * kKvHeads + kv) * kHeadDim + i];
          dot += qkv[h * kHeadDim + i] * k;
        }
        scores[t] = dot * batch.scale;
        top = std::max(top, scores[t]);
      }
      double total = 0.0;
      for (double& v : scores) total += (v = std::exp(v - top));
      for (int32_t t = 0; t < context_lens[s]; ++t) {
        const int64_t slot = block_tables[s * max_blocks + t / kBlockSize] * kBlockSize + t % kBlockSize;
        const bool is_new = t == context_lens[s] - 1;
        for (int64_t i = 0; i < kHeadDim; ++i) {
          const double v = is_new ? qkv[kQ + kKv + kv * kHeadDim + i]
                                  : value0[(slot * kKvHeads + kv) * kHeadDim + i];
          attention[h * kHeadDim + i] += scores[t] / total * v;
        }
      }
    }
    const auto attn_out = matvec(layer.o, attention, kHidden);
    for (int64_t i = 0; i < kHidden; ++i) stream[i] += attn_out[i];
    const auto gate_up = matvec(layer.gate_up, norm(stream, layer.post_norm), 2 * kInter);
    std::vector<double> hidden(kInter);
    for (int64_t i = 0; i < kInter; ++i) {
      hidden[i] = gate_up[i] / (1.0 + std::exp(-gate_up[i])) * gate_up[kInter + i];
    }
    const auto out = matvec(layer.down, hidden, kHidden);
    for (int64_t i = 0; i < kHidden; ++i) {
      ASSERT_NEAR(residual[s * kHidden + i], stream[i], 1e-4 * (1 + std::abs(stream[i])))
          << "seq " << s << " residual " << i;
      ASSERT_NEAR(x[s * kHidden + i], out[i], 1e-4 * (1 + std::abs(out[i])))
          << "seq " << s << " output " << i;
    }
  }
}

TEST(CpuDecoderLayer, AdaptersNameTheBadTensor) {
  const Layer layer;
  const Device cpu{DeviceType::kCpu, 0};
  auto view = [&](const std::vector<float>& v, std::initializer_list<int64_t> shape) {
    return contiguous_view(const_cast<float*>(v.data()), ScalarType::kFloat32, cpu, shape);
  };
  const auto np = [](int64_t out) { return linear_num_panels(out); };
  const auto norm_in = view(layer.input_norm, {kHidden}), norm_post = view(layer.post_norm, {kHidden});
  const auto qkv = view(layer.qkv_p, {np(kQkv), kHidden, 16});
  const auto o = view(layer.o_p, {np(kHidden), kQ, 16});
  const auto gate_up = view(layer.gate_up_p, {np(2 * kInter), kHidden, 16});
  const auto down = view(layer.down_p, {np(kHidden), kInter, 16});
  EXPECT_NO_THROW(CpuDecoderLayer(norm_in, qkv, nullptr, o, norm_post, gate_up, down, kHeads,
                                  kKvHeads, kHeadDim, kEps));
  try {
    CpuDecoderLayer(norm_in, qkv, nullptr, o, norm_post, gate_up, down, kHeads, 3, kHeadDim, kEps);
    FAIL() << "num_kv_heads=3 accepted";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("num_kv_heads=3"), std::string::npos) << e.what();
  }
  // o_proj packed for the wrong input width.
  const auto bad_o = view(layer.o_p, {np(kHidden), kQ / 2, 16});
  try {
    CpuDecoderLayer(norm_in, qkv, nullptr, bad_o, norm_post, gate_up, down, kHeads, kKvHeads,
                    kHeadDim, kEps);
    FAIL() << "a mis-shaped o_packed accepted";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("o_packed"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace infercept
