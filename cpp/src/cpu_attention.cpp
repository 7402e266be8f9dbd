#include "infercept/cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_attention_avx2.h"
#include "cpu_attention_avx512.h"
#include "infercept/attention_args.h"
#include "infercept/errors.h"

// The wheel must run on any x86-64, so it is compiled for baseline SSE2. On GCC/Linux the hot
// function is also cloned for AVX2+FMA and AVX-512 and the loader picks the best clone the
// running CPU supports (ifunc): wider vectors without -march=native. Elsewhere: one baseline copy.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define INFERCEPT_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INFERCEPT_SIMD_CLONES
#endif

namespace infercept {
namespace {

// The wheel is built with plain -O3 (no -march=native, no -ffast-math), so the compiler may not
// reorder a float sum. Keeping kLanes explicit partial sums gives it independent chains it can
// put in SIMD registers (SSE2 on baseline x86-64) without changing the declared order.
constexpr int64_t kLanes = 16;

// exp(x) for x <= 0 (a score minus its running max) as 2^n * e^r, |r| <= ln(2) / 2, with a
// degree-7 Taylor polynomial (relative error < 1e-7). Unlike std::exp it is branch-free and
// vectorises; below -87 it returns ~1e-38 instead of 0, negligible beside the max token's 1.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  x = std::max(x, -87.0f);
  // Truncation of x * log2e - 0.5 (<= 0) rounds x * log2e to an integer n >= -126.
  const int32_t n = static_cast<int32_t>(x * kLog2e - 0.5f);
  const float nf = static_cast<float>(n);
  const float r = (x - nf * kLn2Hi) - nf * kLn2Lo;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n as a float's exponent field
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return poly * two_n;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) partial[lane] += a[i + lane] * b[i + lane];
  }
  float sum = 0.0f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int64_t lane = 0; lane < kLanes; ++lane) sum += partial[lane];
  return sum;
}

// acc[0:n] = acc * factor + weight * x: one pass that both rescales and accumulates.
inline void scale_add(float* acc, float factor, float weight, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] * factor + weight * x[i];
}

inline void add_scaled(float* acc, float weight, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += weight * x[i];
}

constexpr char kOp[] = "paged_decode_attention";

// Per-thread scratch of one (sequence, KV head) task.
struct Scratch {
  explicit Scratch(int64_t group, int64_t block_size)
      : probs(group * block_size), running_max(group), running_sum(group) {}
  std::vector<float> probs;        // [group, block_size] scores, then exp(score - max)
  std::vector<float> running_max;  // [group]
  std::vector<float> running_sum;  // [group] sum of exp(score - running_max)
};

// Attention of the `group` query heads that share KV head `kv_head` of sequence `seq`. The
// output rows double as the float32 accumulators: [group, head_dim], contiguous.
INFERCEPT_SIMD_CLONES void attend_one(const PagedDecodeProblem& p, int64_t seq, int64_t kv_head, Scratch& scratch) {
  const int64_t group = p.num_heads / p.num_kv_heads;
  const int64_t head_dim = p.head_dim;
  const int64_t block_size = p.block_size;
  const int64_t token_stride = p.num_kv_heads * head_dim;  // between tokens of one block
  const int64_t block_stride = block_size * token_stride;
  const int64_t first_row = (seq * p.num_heads + kv_head * group) * head_dim;
  const float* query = p.query + first_row;  // [group, head_dim]
  float* acc = p.out + first_row;            // [group, head_dim]
  const int32_t* table = p.block_tables + seq * p.max_blocks;
  const int64_t context_len = p.context_lens[seq];
  float* probs = scratch.probs.data();
  float* running_max = scratch.running_max.data();
  float* running_sum = scratch.running_sum.data();

  std::fill(acc, acc + group * head_dim, 0.0f);
  std::fill(running_max, running_max + group, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + group, 0.0f);

  // One block at a time: its scores for every query of the group (each K row read once, used
  // `group` times), one rescale of the accumulators per block rather than per token, then its
  // V rows. Online softmax: acc and running_sum are kept relative to running_max.
  for (int64_t start = 0, b = 0; start < context_len; start += block_size, ++b) {
    const int64_t num_tokens = std::min(block_size, context_len - start);
    const int64_t offset = static_cast<int64_t>(table[b]) * block_stride + kv_head * head_dim;
    const float* keys = p.key_cache + offset;
    const float* values = p.value_cache + offset;

    for (int64_t t = 0; t < num_tokens; ++t) {
      const float* key = keys + t * token_stride;
      for (int64_t j = 0; j < group; ++j) {
        probs[j * block_size + t] = p.scale * dot(query + j * head_dim, key, head_dim);
      }
    }
    for (int64_t j = 0; j < group; ++j) {
      float* row = probs + j * block_size;
      float block_max = row[0];
      for (int64_t t = 1; t < num_tokens; ++t) block_max = std::max(block_max, row[t]);
      const float new_max = std::max(running_max[j], block_max);
      // exp(-inf) = 0 on the first block, when acc and running_sum are still zero.
      const float correction = std::exp(running_max[j] - new_max);
      for (int64_t t = 0; t < num_tokens; ++t) row[t] = exp_nonpositive(row[t] - new_max);
      float block_sum = 0.0f;
      for (int64_t t = 0; t < num_tokens; ++t) block_sum += row[t];
      running_sum[j] = running_sum[j] * correction + block_sum;
      running_max[j] = new_max;
      // Fold the rescale into the first token's accumulation: one pass over acc, not two.
      scale_add(acc + j * head_dim, correction, row[0], values, head_dim);
    }
    for (int64_t t = 1; t < num_tokens; ++t) {
      const float* value = values + t * token_stride;
      for (int64_t j = 0; j < group; ++j) {
        add_scaled(acc + j * head_dim, probs[j * block_size + t], value, head_dim);
      }
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    const float inverse = 1.0f / running_sum[j];  // >= 1: the max token contributes exp(0)
    float* row = acc + j * head_dim;
    for (int64_t i = 0; i < head_dim; ++i) row[i] *= inverse;
  }
}

}  // namespace

void check_paged_decode_problem(const PagedDecodeProblem& p) {
  auto positive = [](const char* name, int64_t value) {
    if (value <= 0) throw_invalid_argument(kOp, std::string(name) + "=" + std::to_string(value) + " must be > 0");
  };
  if (p.num_seqs < 0) throw_invalid_argument(kOp, "num_seqs=" + std::to_string(p.num_seqs) + " must be >= 0");
  positive("num_heads", p.num_heads);
  positive("num_kv_heads", p.num_kv_heads);
  positive("head_dim", p.head_dim);
  positive("block_size", p.block_size);
  positive("max_blocks", p.max_blocks);
  positive("num_blocks", p.num_blocks);
  if (p.num_heads % p.num_kv_heads != 0) {
    throw_invalid_argument(kOp, "num_heads=" + std::to_string(p.num_heads) + " must be a multiple of num_kv_heads=" +
         std::to_string(p.num_kv_heads));
  }
  if (!std::isfinite(p.scale)) throw_invalid_argument(kOp, "scale=" + std::to_string(p.scale) + " must be finite");
  if (p.num_seqs == 0) return;
  if (!p.out || !p.query || !p.key_cache || !p.value_cache || !p.block_tables ||
      !p.context_lens) {
    throw_invalid_argument(kOp, "out, query, key_cache, value_cache, block_tables and context_lens must be non-null");
  }
  const int64_t max_context = p.max_blocks * p.block_size;
  for (int64_t seq = 0; seq < p.num_seqs; ++seq) {
    const int64_t context_len = p.context_lens[seq];
    if (context_len < 1 || context_len > max_context) {
      throw_invalid_argument(kOp, "context_lens[" + std::to_string(seq) + "]=" + std::to_string(context_len) +
           " must be in 1..max_blocks * block_size=" + std::to_string(max_context));
    }
    const int64_t blocks_used = (context_len + p.block_size - 1) / p.block_size;
    for (int64_t b = 0; b < blocks_used; ++b) {
      const int32_t block = p.block_tables[seq * p.max_blocks + b];
      if (block < 0 || block >= p.num_blocks) {
        throw_invalid_argument(kOp, "block_tables[" + std::to_string(seq) + ", " + std::to_string(b) + "]=" +
             std::to_string(block) + " must be in [0, num_blocks=" +
             std::to_string(p.num_blocks) + ")");
      }
    }
  }
}

void paged_decode_attention(const PagedDecodeProblem& p) {
  check_paged_decode_problem(p);
  const int64_t group = p.num_heads / p.num_kv_heads;
  const bool avx512_fits = detail::cpu_has_avx512f() && p.head_dim % 16 == 0;
  const bool avx2_fits = detail::cpu_has_avx2_fma() && p.head_dim % 8 == 0;
  if (p.impl == CpuAttentionImpl::kAvx512 && !avx512_fits) {
    throw_invalid_argument(kOp, std::string("impl=kAvx512 needs a CPU with AVX-512 F (") +
         (detail::cpu_has_avx512f() ? "present" : "absent") +
         ") and head_dim % 16 == 0 (head_dim=" + std::to_string(p.head_dim) + ")");
  }
  if (p.impl == CpuAttentionImpl::kAvx2 && !avx2_fits) {
    throw_invalid_argument(kOp, std::string("impl=kAvx2 needs a CPU with AVX2 and FMA (") +
         (detail::cpu_has_avx2_fma() ? "present" : "absent") +
         ") and head_dim % 8 == 0 (head_dim=" + std::to_string(p.head_dim) + ")");
  }
  if (p.num_seqs == 0) return;
#ifdef _OPENMP
  const int max_threads = omp_get_max_threads();
#else
  const int max_threads = 1;
#endif
  // kAuto: the widest body that fits.
  const bool use_avx512 = p.impl == CpuAttentionImpl::kAvx512 ||
                          (p.impl == CpuAttentionImpl::kAuto && avx512_fits);
  const bool use_avx2 = !use_avx512 && (p.impl == CpuAttentionImpl::kAvx2 ||
                                        (p.impl == CpuAttentionImpl::kAuto && avx2_fits));
  if (use_avx512 || use_avx2) {
    // A task is a whole sequence when there are enough to keep every thread busy (its blocks
    // are then read whole, in address order), else one (sequence, KV head) pair.
    const bool per_sequence = p.num_seqs >= 2 * max_threads;
    const int64_t heads_per_task = per_sequence ? p.num_kv_heads : 1;
    const int64_t tasks_per_seq = p.num_kv_heads / heads_per_task;
    const int64_t num_tasks = p.num_seqs * tasks_per_seq;
    const int num_threads = num_tasks > 1 ? max_threads : 1;
    const int64_t rows = heads_per_task * group;
    const int64_t floats = use_avx512 ? detail::avx512_scratch_floats(rows, p.block_size)
                                      : detail::avx2_scratch_floats(rows, p.block_size);
    const auto attend = use_avx512 ? detail::attend_avx512 : detail::attend_avx2;
    std::vector<float> scratch(static_cast<size_t>(num_threads) * floats);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
    for (int64_t task = 0; task < num_tasks; ++task) {
#ifdef _OPENMP
      float* mine = scratch.data() + omp_get_thread_num() * floats;
#else
      float* mine = scratch.data();
#endif
      const int64_t kv_begin = task % tasks_per_seq * heads_per_task;
      attend(p, task / tasks_per_seq, kv_begin, kv_begin + heads_per_task, mine);
    }
    return;
  }
  const int64_t num_tasks = p.num_seqs * p.num_kv_heads;
  // Scratch for every thread is allocated here, before the parallel region, because nothing
  // may throw inside it. Tasks differ in context length, so they are handed out dynamically.
  const int num_threads = num_tasks > 1 ? max_threads : 1;
  std::vector<Scratch> scratches(num_threads, Scratch(group, p.block_size));
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
#endif
  for (int64_t task = 0; task < num_tasks; ++task) {
#ifdef _OPENMP
    Scratch& scratch = scratches[omp_get_thread_num()];
#else
    Scratch& scratch = scratches[0];
#endif
    attend_one(p, task / p.num_kv_heads, task % p.num_kv_heads, scratch);
  }
}

void paged_decode_attention(const TensorView& out, const TensorView& query,
                            const TensorView& key_cache, const TensorView& value_cache,
                            const TensorView& block_tables, const TensorView& context_lens,
                            float scale) {
  const AttentionSizes s =
      check_attention_args("paged_decode_attention", out, query, key_cache, value_cache,
                           block_tables, context_lens, ScalarType::kFloat32,
                           Device{DeviceType::kCpu, 0});
  if (s.num_rows != s.num_seqs) {
    throw_invalid_argument(kOp, "query has " + std::to_string(s.num_rows) + " rows, expected one per sequence of " +
         "block_tables (" + std::to_string(s.num_seqs) + ")");
  }
  PagedDecodeProblem p;
  p.out = out.data_as<float>();
  p.query = query.data_as<const float>();
  p.key_cache = key_cache.data_as<const float>();
  p.value_cache = value_cache.data_as<const float>();
  p.block_tables = block_tables.data_as<const int32_t>();
  p.context_lens = context_lens.data_as<const int32_t>();
  copy_sizes(s, p);
  p.scale = scale;
  paged_decode_attention(p);
}

bool cpu_attention_has_avx2() { return detail::cpu_has_avx2_fma(); }

bool cpu_attention_has_avx512() { return detail::cpu_has_avx512f(); }

bool cpu_attention_has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace infercept
