// The CUDA KV-write and paged-attention kernels against a float64 host reference (label `gpu`;
// every test skips without a device). Awkward shapes: batch 1, 3, 7, 33; context lengths 1,
// 15, 16, 17, 1000, 4097 (block boundaries of 16-token blocks); shuffled block tables; GQA;
// float32 / float16 / bfloat16; head_dim 64 and 128. Outputs are poisoned before each run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "attention_kernels.h"
#include "gpu_test_util.h"
#include "infercept/errors.h"

using infercept::cuda::DType;
using infercept::cuda::PagedAttentionProblem;

namespace {

constexpr int64_t kBlockSize = 16;
const std::vector<int32_t> kContexts = {1, 15, 16, 17, 1000, 4097};

// Host values stored in the kernel's dtype; `values` holds what the device sees, as float.
struct Buffer {
  DType dtype;
  std::vector<float> values;
  std::vector<unsigned char> raw;
  void* device = nullptr;

  Buffer(DType d, size_t n) : dtype(d), values(n), raw(n * infercept::cuda::dtype_size(d)) {}
  ~Buffer() { if (device) cudaFree(device); }
  void fill_random(std::mt19937& rng) {
    std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
    for (size_t i = 0; i < values.size(); ++i) store(i, dist(rng));
  }
  void store(size_t i, float f) {
    switch (dtype) {
      case DType::kFloat32: std::memcpy(&raw[i * 4], &f, 4); values[i] = f; break;
      case DType::kFloat16: { uint16_t h = gpu_test::float_to_half(f); std::memcpy(&raw[i * 2], &h, 2); values[i] = gpu_test::half_to_float(h); break; }
      case DType::kBFloat16: { uint16_t h = gpu_test::float_to_bf16(f); std::memcpy(&raw[i * 2], &h, 2); values[i] = gpu_test::bf16_to_float(h); break; }
    }
  }
  float load_raw(size_t i) const {
    float f = 0;
    uint16_t h = 0;
    switch (dtype) {
      case DType::kFloat32: std::memcpy(&f, &raw[i * 4], 4); return f;
      case DType::kFloat16: std::memcpy(&h, &raw[i * 2], 2); return gpu_test::half_to_float(h);
      case DType::kBFloat16: std::memcpy(&h, &raw[i * 2], 2); return gpu_test::bf16_to_float(h);
    }
    return f;
  }
  void upload() {
    if (!device) EXPECT_EQ(cudaMalloc(&device, raw.size()), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(device, raw.data(), raw.size(), cudaMemcpyHostToDevice), cudaSuccess);
  }
  void download() { EXPECT_EQ(cudaMemcpy(raw.data(), device, raw.size(), cudaMemcpyDeviceToHost), cudaSuccess); }
};

template <typename T>
T* upload_vector(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)), cudaSuccess);
  if (!v.empty()) EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}

double tolerance(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 1e-5;
    case DType::kFloat16: return 2e-3;
    case DType::kBFloat16: return 1e-2;
  }
  return 0;
}

// Runs paged attention for sequences (query_len, context_len) and compares with float64.
void check_attention(DType dtype, int64_t head_dim, const std::vector<std::pair<int32_t, int32_t>>& seqs,
                     bool is_decode, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t num_heads = 8, num_kv_heads = 2, group = num_heads / num_kv_heads;
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  int64_t num_rows = 0, max_blocks = 1, total_blocks = 0;
  std::vector<int32_t> query_start = {0}, context_lens;
  for (auto [q, c] : seqs) {
    num_rows += q;
    query_start.push_back(static_cast<int32_t>(num_rows));
    context_lens.push_back(c);
    const int64_t blocks = (c + kBlockSize - 1) / kBlockSize;
    max_blocks = std::max(max_blocks, blocks);
    total_blocks += blocks;
  }
  const int64_t num_blocks = total_blocks + 5;
  std::vector<int32_t> order(num_blocks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> tables(num_seqs * max_blocks, 0);
  int64_t next = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t blocks = (context_lens[s] + kBlockSize - 1) / kBlockSize;
    for (int64_t b = 0; b < blocks; ++b) tables[s * max_blocks + b] = order[next++];
    for (int64_t b = blocks; b < max_blocks; ++b) tables[s * max_blocks + b] = -7;  // never read
  }
  const size_t cache_elems = static_cast<size_t>(num_blocks * kBlockSize * num_kv_heads * head_dim);
  Buffer query(dtype, num_rows * num_heads * head_dim), key(dtype, cache_elems), value(dtype, cache_elems),
      out(dtype, num_rows * num_heads * head_dim);
  query.fill_random(rng);
  key.fill_random(rng);
  value.fill_random(rng);
  for (size_t i = 0; i < out.values.size(); ++i) out.store(i, NAN);  // poison
  query.upload();
  key.upload();
  value.upload();
  out.upload();
  int32_t* d_tables = upload_vector(tables);
  int32_t* d_context = upload_vector(context_lens);
  int32_t* d_start = upload_vector(query_start);

  PagedAttentionProblem p;
  p.out = out.device;
  p.query = query.device;
  p.key_cache = key.device;
  p.value_cache = value.device;
  p.block_tables = d_tables;
  p.context_lens = d_context;
  p.query_start = is_decode ? nullptr : d_start;
  p.num_rows = num_rows;
  p.num_seqs = num_seqs;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = kBlockSize;
  p.max_blocks = max_blocks;
  p.num_blocks = num_blocks;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  p.dtype = dtype;
  infercept::cuda::paged_attention(p, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  out.download();

  double err2 = 0, ref2 = 0;
  std::vector<double> scores, acc(head_dim);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int32_t q_len = seqs[s].first, ctx = seqs[s].second;
    for (int32_t j = 0; j < q_len; ++j) {
      const int64_t row = query_start[s] + j;
      const int32_t attended = ctx - q_len + j + 1;
      for (int64_t h = 0; h < num_heads; ++h) {
        const int64_t kvh = h / group;
        scores.assign(attended, 0);
        double max_score = -INFINITY;
        for (int32_t t = 0; t < attended; ++t) {
          const int64_t slot = int64_t{tables[s * max_blocks + t / kBlockSize]} * kBlockSize + t % kBlockSize;
          double dot = 0;
          for (int64_t d = 0; d < head_dim; ++d) {
            dot += double{query.values[(row * num_heads + h) * head_dim + d]} *
                   key.values[(slot * num_kv_heads + kvh) * head_dim + d];
          }
          scores[t] = dot * p.scale;
          max_score = std::max(max_score, scores[t]);
        }
        double total = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int32_t t = 0; t < attended; ++t) {
          const double w = std::exp(scores[t] - max_score);
          total += w;
          const int64_t slot = int64_t{tables[s * max_blocks + t / kBlockSize]} * kBlockSize + t % kBlockSize;
          for (int64_t d = 0; d < head_dim; ++d) acc[d] += w * value.values[(slot * num_kv_heads + kvh) * head_dim + d];
        }
        for (int64_t d = 0; d < head_dim; ++d) {
          const double ref = acc[d] / total;
          const double got = out.load_raw((row * num_heads + h) * head_dim + d);
          ASSERT_FALSE(std::isnan(got)) << "row " << row << " head " << h << " d " << d << " not written";
          err2 += (got - ref) * (got - ref);
          ref2 += ref * ref;
        }
      }
    }
  }
  EXPECT_LT(std::sqrt(err2 / ref2), tolerance(dtype)) << "dtype " << static_cast<int>(dtype) << " head_dim " << head_dim;
  cudaFree(d_tables);
  cudaFree(d_context);
  cudaFree(d_start);
}

class PagedAttentionTest : public ::testing::TestWithParam<std::tuple<DType, int64_t>> {
 protected:
  void SetUp() override { SKIP_WITHOUT_CUDA_DEVICE(); }
};

}  // namespace

TEST_P(PagedAttentionTest, DecodeMatchesReferenceOverBatchesAndContexts) {
  const auto [dtype, head_dim] = GetParam();
  uint32_t seed = 1;
  for (int batch : {1, 3, 7, 33}) {
    std::vector<std::pair<int32_t, int32_t>> seqs;
    for (int i = 0; i < batch; ++i) seqs.push_back({1, kContexts[(i + batch) % kContexts.size()]});
    check_attention(dtype, head_dim, seqs, /*is_decode=*/true, seed++);
  }
  for (int32_t context : kContexts) check_attention(dtype, head_dim, {{1, context}}, true, seed++);
}

TEST_P(PagedAttentionTest, PrefillAndRecomputeChunksAreCausal) {
  const auto [dtype, head_dim] = GetParam();
  // (query_len, context_len): fresh prefills, chunks over cached context, decodes mixed in.
  check_attention(dtype, head_dim, {{1, 1}, {15, 15}, {16, 16}, {17, 17}}, false, 101);
  check_attention(dtype, head_dim, {{5, 17}, {1, 1000}, {33, 1000}, {3, 4097}, {16, 48}}, false, 102);
}

INSTANTIATE_TEST_SUITE_P(DTypesAndHeadDims, PagedAttentionTest,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                                            ::testing::Values(int64_t{64}, int64_t{128})));

TEST(PagedAttentionChecks, RejectsBadShapes) {
  PagedAttentionProblem p;
  int dummy[4] = {};
  p.out = dummy;
  p.query = dummy;
  p.key_cache = p.value_cache = dummy;
  p.block_tables = p.context_lens = dummy;
  p.num_rows = p.num_seqs = 1;
  p.num_heads = 8;
  p.num_kv_heads = 3;
  p.head_dim = 64;
  p.block_size = p.max_blocks = p.num_blocks = 1;
  EXPECT_THROW(infercept::cuda::check_paged_attention_problem(p), infercept::InvalidArgumentError);
  p.num_kv_heads = 2;
  p.head_dim = 96;
  EXPECT_THROW(infercept::cuda::check_paged_attention_problem(p), infercept::InvalidArgumentError);
  p.head_dim = 64;
  p.num_rows = 2;  // decode needs one row per sequence
  EXPECT_THROW(infercept::cuda::check_paged_attention_problem(p), infercept::InvalidArgumentError);
}

TEST(KvWrite, WritesEverySlotBitExactAndSkipsPadding) {
  SKIP_WITHOUT_CUDA_DEVICE();
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int64_t head_dim : {64, 128}) {
      std::mt19937 rng(static_cast<uint32_t>(head_dim) + static_cast<uint32_t>(dtype));
      const int64_t num_kv_heads = 3, num_blocks = 9, num_tokens = 33;
      const size_t row = num_kv_heads * head_dim;
      Buffer key(dtype, num_tokens * row), value(dtype, num_tokens * row), kc(dtype, num_blocks * kBlockSize * row),
          vc(dtype, num_blocks * kBlockSize * row);
      key.fill_random(rng);
      value.fill_random(rng);
      kc.fill_random(rng);
      vc.fill_random(rng);
      std::vector<int64_t> slots(num_blocks * kBlockSize);
      std::iota(slots.begin(), slots.end(), 0);
      std::shuffle(slots.begin(), slots.end(), rng);
      slots.resize(num_tokens);
      slots[4] = -1;  // padding
      for (auto* b : {&key, &value, &kc, &vc}) b->upload();
      const std::vector<unsigned char> kc_before = kc.raw;
      int64_t* d_slots = upload_vector(slots);
      infercept::cuda::KvWriteProblem p;
      p.key = key.device;
      p.value = value.device;
      p.key_cache = kc.device;
      p.value_cache = vc.device;
      p.slot_mapping = d_slots;
      p.num_tokens = num_tokens;
      p.num_kv_heads = num_kv_heads;
      p.head_dim = head_dim;
      p.block_size = kBlockSize;
      p.num_blocks = num_blocks;
      p.dtype = dtype;
      infercept::cuda::write_kv_cache(p, nullptr);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      kc.download();
      vc.download();
      const size_t row_bytes = row * infercept::cuda::dtype_size(dtype);
      for (int64_t t = 0; t < num_tokens; ++t) {
        if (slots[t] < 0) continue;
        ASSERT_EQ(std::memcmp(&kc.raw[slots[t] * row_bytes], &key.raw[t * row_bytes], row_bytes), 0) << "token " << t;
        ASSERT_EQ(std::memcmp(&vc.raw[slots[t] * row_bytes], &value.raw[t * row_bytes], row_bytes), 0) << "token " << t;
      }
      // Slots nobody wrote keep their bytes.
      std::vector<bool> written(num_blocks * kBlockSize, false);
      for (int64_t s : slots) if (s >= 0) written[s] = true;
      for (size_t s = 0; s < written.size(); ++s) {
        if (!written[s]) ASSERT_EQ(std::memcmp(&kc.raw[s * row_bytes], &kc_before[s * row_bytes], row_bytes), 0);
      }
      cudaFree(d_slots);
    }
  }
}
