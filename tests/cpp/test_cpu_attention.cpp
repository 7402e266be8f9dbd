// The CPU paged decode kernel against a plain two-pass softmax reference over awkward shapes.
#include "infercept/cpu_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "infercept/errors.h"

namespace infercept {
namespace {

struct Case {
  int64_t num_heads, num_kv_heads, head_dim, block_size;
  std::vector<int32_t> context_lens;
};

// Builds random caches, shuffled (non-contiguous) block tables and queries; runs the kernel (the
// raw-pointer layer, or the tensor adapter over views of the same buffers) and a
// double-precision reference; returns the largest absolute difference.
double max_error(const Case& c, uint32_t seed, bool through_views = false,
                 CpuAttentionImpl impl = CpuAttentionImpl::kAuto) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  const int64_t num_seqs = static_cast<int64_t>(c.context_lens.size());
  int64_t max_blocks = 1, num_blocks = 0;
  for (int32_t len : c.context_lens) {
    const int64_t used = (len + c.block_size - 1) / c.block_size;
    max_blocks = std::max(max_blocks, used);
    num_blocks += used;
  }
  num_blocks += 3;
  std::vector<int32_t> free_blocks(num_blocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), rng);
  std::vector<int32_t> tables(num_seqs * max_blocks, -1);  // -1 padding must never be read
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t b = 0; b * c.block_size < c.context_lens[s]; ++b) {
      tables[s * max_blocks + b] = free_blocks.back();
      free_blocks.pop_back();
    }
  }
  const int64_t token_size = c.num_kv_heads * c.head_dim;
  std::vector<float> keys(num_blocks * c.block_size * token_size);
  std::vector<float> values(keys.size());
  std::vector<float> query(num_seqs * c.num_heads * c.head_dim);
  for (auto* v : {&keys, &values, &query}) {
    for (float& x : *v) x = normal(rng);
  }
  std::vector<float> out(query.size(), NAN);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  PagedDecodeProblem p;
  p.out = out.data();
  p.query = query.data();
  p.key_cache = keys.data();
  p.value_cache = values.data();
  p.block_tables = tables.data();
  p.context_lens = c.context_lens.data();
  p.num_seqs = num_seqs;
  p.num_heads = c.num_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.block_size = c.block_size;
  p.max_blocks = max_blocks;
  p.num_blocks = num_blocks;
  p.scale = scale;
  p.impl = impl;
  if (through_views) {
    const Device cpu;
    const auto f32 = ScalarType::kFloat32, i32 = ScalarType::kInt32;
    const auto cache = {num_blocks, c.block_size, c.num_kv_heads, c.head_dim};
    paged_decode_attention(
        contiguous_view(out.data(), f32, cpu, {num_seqs, c.num_heads, c.head_dim}),
        contiguous_view(query.data(), f32, cpu, {num_seqs, c.num_heads, c.head_dim}),
        contiguous_view(keys.data(), f32, cpu, cache),
        contiguous_view(values.data(), f32, cpu, cache),
        contiguous_view(tables.data(), i32, cpu, {num_seqs, max_blocks}),
        contiguous_view(const_cast<int32_t*>(c.context_lens.data()), i32, cpu, {num_seqs}),
        scale);
  } else {
    paged_decode_attention(p);
  }

  double worst = 0.0;
  const int64_t group = c.num_heads / c.num_kv_heads;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t h = 0; h < c.num_heads; ++h) {
      const float* q = &query[(s * c.num_heads + h) * c.head_dim];
      std::vector<double> scores(c.context_lens[s]);
      auto row = [&](const std::vector<float>& cache, int64_t pos) {
        const int64_t block = tables[s * max_blocks + pos / c.block_size];
        return &cache[((block * c.block_size + pos % c.block_size) * c.num_kv_heads +
                       h / group) * c.head_dim];
      };
      for (int64_t t = 0; t < c.context_lens[s]; ++t) {
        const float* k = row(keys, t);
        double dot = 0.0;
        for (int64_t d = 0; d < c.head_dim; ++d) dot += double(q[d]) * k[d];
        scores[t] = dot * scale;
      }
      const double top = *std::max_element(scores.begin(), scores.end());
      double total = 0.0;
      for (double& x : scores) total += (x = std::exp(x - top));
      for (int64_t d = 0; d < c.head_dim; ++d) {
        double want = 0.0;
        for (int64_t t = 0; t < c.context_lens[s]; ++t) want += scores[t] * row(values, t)[d];
        const double got = out[(s * c.num_heads + h) * c.head_dim + d];
        worst = std::max(worst, std::abs(got - want / total));
      }
    }
  }
  return worst;
}

// The bodies the running CPU can take: the portable loops always, AVX2+FMA and AVX-512 where
// present (each needs head_dim a multiple of 8 and 16 respectively: see fits()).
std::vector<CpuAttentionImpl> impls_here() {
  std::vector<CpuAttentionImpl> impls = {CpuAttentionImpl::kPortable};
  if (cpu_attention_has_avx2()) impls.push_back(CpuAttentionImpl::kAvx2);
  if (cpu_attention_has_avx512()) impls.push_back(CpuAttentionImpl::kAvx512);
  return impls;
}

// Whether a forced body takes this head_dim (kAuto and kPortable take any).
bool fits(CpuAttentionImpl impl, int64_t head_dim) {
  if (impl == CpuAttentionImpl::kAvx2) return head_dim % 8 == 0;
  if (impl == CpuAttentionImpl::kAvx512) return head_dim % 16 == 0;
  return true;
}

TEST(CpuAttention, MatchesReferenceOverAwkwardShapes) {
  const std::vector<int32_t> lens = {1, 15, 16, 17, 100, 1000, 33};
  for (CpuAttentionImpl impl : impls_here()) {
    for (auto [heads, kv_heads] : {std::pair{4, 4}, {9, 3}, {8, 2}, {12, 1}}) {
      // 40 and 200 leave a remainder after the AVX2 body's 64-float chunks.
      for (int64_t head_dim : {64, 40, 200, 8}) {
        if (!fits(impl, head_dim)) continue;
        for (int64_t block_size : {16, 5}) {
          Case c{heads, kv_heads, head_dim, block_size, lens};
          EXPECT_LT(max_error(c, 7, false, impl), 1e-5)
              << "impl=" << static_cast<int>(impl) << " heads=" << heads
              << " kv_heads=" << kv_heads << " head_dim=" << head_dim
              << " block_size=" << block_size;
        }
      }
    }
  }
}

TEST(CpuAttention, MatchesReferenceAtTheAvx2BodysSeams) {
  // The AVX2 body scores eight tokens a vector (lengths and block sizes around multiples of 8;
  // a block's last chunk may be partial), takes the rescale factors eight heads at a time
  // (group 16 > 8), accumulates V for three heads at once (groups 2, 5 = 3 + 2, 16 = 5 x 3 + 1)
  // over 32-float chunks of head_dim (16, 24, 48 and 56 leave 2, 3, 2 and 3 vectors over),
  // and runs whole sequences as tasks when there are enough of them (nine of uneven length).
  const std::vector<int32_t> lens = {1, 7, 8, 9, 12, 13, 24, 31, 250};
  for (CpuAttentionImpl impl : impls_here()) {
    for (auto [heads, kv_heads] : {std::pair{2, 1}, {10, 2}, {16, 1}, {9, 3}}) {
      for (int64_t head_dim : {16, 24, 48, 56, 128}) {
        if (!fits(impl, head_dim)) continue;
        for (int64_t block_size : {8, 12, 16}) {
          Case c{heads, kv_heads, head_dim, block_size, lens};
          EXPECT_LT(max_error(c, 13, false, impl), 1e-5)
              << "impl=" << static_cast<int>(impl) << " heads=" << heads
              << " kv_heads=" << kv_heads << " head_dim=" << head_dim
              << " block_size=" << block_size;
        }
      }
    }
  }
}

TEST(CpuAttention, MatchesReferenceAtTheAvx512BodysSeams) {
  if (!cpu_attention_has_avx512()) GTEST_SKIP() << "this CPU has no AVX-512 F";
  // The AVX-512 body scores sixteen tokens a vector (lengths 1, block_size - 1, block_size,
  // block_size + 1 and long; block sizes below, at and above 16, so a block has a partial
  // chunk or two), takes the rescale factors sixteen heads at a time (group 17 > 16),
  // accumulates V for up to four heads at once (groups 1, 3, 5 = 4 + 1, 17 = 4 x 4 + 1) over
  // 64-float chunks of head_dim (80: one vector over; the tests above add 16, 48 and 128), and
  // runs whole sequences as tasks at batch 7 and 19, (sequence, KV head) pairs at 1 and 3.
  for (int64_t block_size : {16, 32, 5}) {
    const std::vector<int32_t> lens = {1,
                                       static_cast<int32_t>(block_size - 1),
                                       static_cast<int32_t>(block_size),
                                       static_cast<int32_t>(block_size + 1),
                                       384,
                                       static_cast<int32_t>(3 * block_size + 7)};
    for (int64_t batch : {1, 3, 7, 19}) {
      std::vector<int32_t> batch_lens(batch);
      for (int64_t s = 0; s < batch; ++s) batch_lens[s] = lens[(s * 3 + batch) % lens.size()];
      for (auto [heads, kv_heads] : {std::pair{3, 3}, {9, 3}, {10, 2}, {17, 1}}) {
        for (int64_t head_dim : {64, 128, 80}) {
          Case c{heads, kv_heads, head_dim, block_size, batch_lens};
          EXPECT_LT(max_error(c, 17, false, CpuAttentionImpl::kAvx512), 1e-5)
              << "batch=" << batch << " heads=" << heads << " kv_heads=" << kv_heads
              << " head_dim=" << head_dim << " block_size=" << block_size;
        }
      }
    }
  }
}

TEST(CpuAttention, EveryContextLengthAroundABlockOnEveryBody) {
  // One sequence alone, so every block boundary case is the whole problem.
  for (CpuAttentionImpl impl : impls_here()) {
    for (int64_t block_size : {16, 32}) {
      for (int32_t len : {1, static_cast<int32_t>(block_size - 1),
                          static_cast<int32_t>(block_size), static_cast<int32_t>(block_size + 1),
                          static_cast<int32_t>(2 * block_size + 1), 384}) {
        for (auto [heads, kv_heads] : {std::pair{9, 3}, {4, 4}}) {
          Case c{heads, kv_heads, 64, block_size, {len}};
          EXPECT_LT(max_error(c, 19, false, impl), 1e-5)
              << "impl=" << static_cast<int>(impl) << " len=" << len
              << " block_size=" << block_size << " heads=" << heads;
        }
      }
    }
  }
}

TEST(CpuAttention, AutoTakesThePortableLoopsWhereAvx2CannotRun) {
  // head_dim 36 is no multiple of 8: kAuto must still be right, and kAvx2 and kAvx512 refuse it.
  Case c{9, 3, 36, 16, {1, 17, 100}};
  EXPECT_LT(max_error(c, 5), 1e-5);
  EXPECT_THROW(max_error(c, 5, false, CpuAttentionImpl::kAvx2), InvalidArgumentError);
  EXPECT_THROW(max_error(c, 5, false, CpuAttentionImpl::kAvx512), InvalidArgumentError);
}

TEST(CpuAttention, AutoTakesAvx2WhereAvx512CannotRun) {
  // head_dim 40 is a multiple of 8 but not of 16: kAvx512 refuses it, kAuto is still right.
  Case c{9, 3, 40, 16, {1, 17, 100}};
  EXPECT_LT(max_error(c, 5), 1e-5);
  EXPECT_THROW(max_error(c, 5, false, CpuAttentionImpl::kAvx512), InvalidArgumentError);
}

TEST(CpuAttention, ForcingAvx512WithoutItThrows) {
  if (cpu_attention_has_avx512()) GTEST_SKIP() << "this CPU has AVX-512 F";
  Case c{9, 3, 64, 16, {1, 17, 100}};
  EXPECT_THROW(max_error(c, 5, false, CpuAttentionImpl::kAvx512), InvalidArgumentError);
}

TEST(CpuAttention, FewSequencesSplitByKvHead) {
  // One or two sequences are too few to give each thread whole ones: the tasks are then
  // (sequence, KV head) pairs, on every body.
  for (CpuAttentionImpl impl : impls_here()) {
    for (std::vector<int32_t> lens : {std::vector<int32_t>{1000}, {100, 33}}) {
      Case c{9, 3, 64, 16, lens};
      EXPECT_LT(max_error(c, 11, false, impl), 1e-5) << "impl=" << static_cast<int>(impl);
    }
  }
}

TEST(CpuAttention, TensorAdapterMatchesReference) {
  for (auto [heads, kv_heads] : {std::pair{9, 3}, {8, 2}}) {
    Case c{heads, kv_heads, 64, 16, {1, 17, 100, 33}};
    EXPECT_LT(max_error(c, 3, /*through_views=*/true), 1e-5) << "heads=" << heads;
  }
}

TEST(CpuAttention, RejectsBadArgumentsBeforeWriting) {
  std::vector<float> buffer(64 * 4, 0.0f), out(4, 0.0f);
  std::vector<int32_t> table = {0, 9}, lens = {20};
  PagedDecodeProblem p;
  p.out = out.data();
  p.query = p.key_cache = p.value_cache = buffer.data();
  p.block_tables = table.data();
  p.context_lens = lens.data();
  p.num_seqs = 1;
  p.num_heads = p.num_kv_heads = 1;
  p.head_dim = 4;
  p.block_size = 16;
  p.max_blocks = 2;
  p.num_blocks = 4;
  EXPECT_THROW(paged_decode_attention(p), InvalidArgumentError);  // block 9 >= num_blocks 4
  table[1] = 3;
  lens[0] = 33;
  EXPECT_THROW(paged_decode_attention(p), InvalidArgumentError);  // 33 > 2 blocks of 16
  lens[0] = 20;
  p.num_heads = 3;
  p.num_kv_heads = 2;
  EXPECT_THROW(paged_decode_attention(p), InvalidArgumentError);  // 3 % 2 != 0
  p.num_heads = p.num_kv_heads = 1;
  EXPECT_NO_THROW(paged_decode_attention(p));
}

}  // namespace
}  // namespace infercept
