// Adapters of the paged-KV kernels: argument checks, dispatch over dtype and head_dim, launch.
#include "attention_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <limits>
#include <string>

#include "cuda_check.h"
#include "infercept/errors.h"
#include "kernels/kv_write_kernel.cuh"
#include "kernels/paged_attention_kernel.cuh"

namespace infercept::cuda {

namespace {

void check_positive(const char* where, const char* field, int64_t value) {
  if (value <= 0) {
    throw InvalidArgumentError(std::string(where) + ": " + field + "=" + std::to_string(value) + " must be > 0");
  }
}

void check_not_negative(const char* where, const char* field, int64_t value) {
  if (value < 0) {
    throw InvalidArgumentError(std::string(where) + ": " + field + "=" + std::to_string(value) + " must be >= 0");
  }
}

void check_not_null(const char* where, const char* field, const void* p) {
  if (p == nullptr) throw InvalidArgumentError(std::string(where) + ": " + field + " is a null pointer");
}

void check_aligned(const char* where, const char* field, const void* p, size_t alignment) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignment != 0) {
    throw InvalidArgumentError(std::string(where) + ": " + field + " is not " + std::to_string(alignment) +
                               "-byte aligned");
  }
}

void check_fits_int32(const char* where, const char* field, int64_t value) {
  if (value > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgumentError(std::string(where) + ": " + field + "=" + std::to_string(value) +
                               " exceeds the kernel's int32 limit " +
                               std::to_string(std::numeric_limits<int32_t>::max()));
  }
}

template <typename Word>
void launch_kv_write(const KvWriteProblem& p, int64_t row_bytes, cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(p.num_tokens);
  kernels::kv_write_kernel<Word><<<grid, kernels::kKvWriteThreads, 0, stream>>>(
      static_cast<const Word*>(p.key), static_cast<const Word*>(p.value), static_cast<Word*>(p.key_cache),
      static_cast<Word*>(p.value_cache), p.slot_mapping, row_bytes / static_cast<int64_t>(sizeof(Word)),
      p.num_blocks * p.block_size);
  INFERCEPT_CUDA_CHECK_LAUNCH("kv_write_kernel");
}

template <typename T, int kHeadDim>
void launch_paged_attention(const PagedAttentionProblem& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_rows), static_cast<unsigned>(p.num_heads));
  kernels::paged_attention_kernel<T, kHeadDim><<<grid, kernels::kAttentionThreads, 0, stream>>>(
      static_cast<T*>(p.out), static_cast<const T*>(p.query), static_cast<const T*>(p.key_cache),
      static_cast<const T*>(p.value_cache), p.block_tables, p.context_lens, p.query_start,
      static_cast<int32_t>(p.num_seqs), static_cast<int32_t>(p.num_heads), static_cast<int32_t>(p.num_kv_heads),
      static_cast<int32_t>(p.block_size), static_cast<int32_t>(p.max_blocks), static_cast<int32_t>(p.num_blocks),
      p.scale);
  INFERCEPT_CUDA_CHECK_LAUNCH("paged_attention_kernel");
}

template <typename T>
void dispatch_head_dim(const PagedAttentionProblem& p, cudaStream_t stream) {
  if (p.head_dim == 64) {
    launch_paged_attention<T, 64>(p, stream);
  } else {
    launch_paged_attention<T, 128>(p, stream);
  }
}

}  // namespace

int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  throw InvalidArgumentError("dtype=" + std::to_string(static_cast<int32_t>(dtype)) +
                             " is not a kernel dtype (0 float32, 1 float16, 2 bfloat16)");
}

void check_kv_write_problem(const KvWriteProblem& p) {
  constexpr const char* where = "write_kv_cache";
  dtype_size(p.dtype);
  check_not_negative(where, "num_tokens", p.num_tokens);
  check_positive(where, "num_kv_heads", p.num_kv_heads);
  check_positive(where, "head_dim", p.head_dim);
  check_positive(where, "block_size", p.block_size);
  check_positive(where, "num_blocks", p.num_blocks);
  check_fits_int32(where, "num_tokens", p.num_tokens);
  check_not_null(where, "key", p.key);
  check_not_null(where, "value", p.value);
  check_not_null(where, "key_cache", p.key_cache);
  check_not_null(where, "value_cache", p.value_cache);
  check_not_null(where, "slot_mapping", p.slot_mapping);
}

void write_kv_cache(const KvWriteProblem& p, cudaStream_t stream) {
  check_kv_write_problem(p);
  if (p.num_tokens == 0) return;
  const int64_t row_bytes = p.num_kv_heads * p.head_dim * dtype_size(p.dtype);
  auto all_aligned = [&](size_t alignment) {
    for (const void* ptr : {p.key, p.value, static_cast<const void*>(p.key_cache), static_cast<const void*>(p.value_cache)}) {
      if (reinterpret_cast<std::uintptr_t>(ptr) % alignment != 0) return false;
    }
    return row_bytes % static_cast<int64_t>(alignment) == 0;
  };
  // Widest word every row start allows: rows are moved bytewise-exact whatever the dtype.
  if (all_aligned(16)) {
    launch_kv_write<uint4>(p, row_bytes, stream);
  } else if (all_aligned(4)) {
    launch_kv_write<uint32_t>(p, row_bytes, stream);
  } else {
    launch_kv_write<uint16_t>(p, row_bytes, stream);
  }
}

void check_paged_attention_problem(const PagedAttentionProblem& p) {
  constexpr const char* where = "paged_attention";
  dtype_size(p.dtype);
  check_not_negative(where, "num_rows", p.num_rows);
  check_not_negative(where, "num_seqs", p.num_seqs);
  check_positive(where, "num_heads", p.num_heads);
  check_positive(where, "num_kv_heads", p.num_kv_heads);
  check_positive(where, "block_size", p.block_size);
  check_positive(where, "max_blocks", p.max_blocks);
  check_positive(where, "num_blocks", p.num_blocks);
  if (p.head_dim != 64 && p.head_dim != 128) {
    throw InvalidArgumentError("paged_attention: head_dim=" + std::to_string(p.head_dim) +
                               " is not supported: the kernel is built for 64 and 128");
  }
  if (p.num_heads % p.num_kv_heads != 0) {
    throw InvalidArgumentError("paged_attention: num_heads=" + std::to_string(p.num_heads) +
                               " is not a multiple of num_kv_heads=" + std::to_string(p.num_kv_heads));
  }
  if (p.num_heads > 65535) {
    throw InvalidArgumentError("paged_attention: num_heads=" + std::to_string(p.num_heads) +
                               " exceeds the grid limit 65535");
  }
  check_fits_int32(where, "num_rows", p.num_rows);
  check_fits_int32(where, "num_blocks * block_size", p.num_blocks * p.block_size);
  check_fits_int32(where, "max_blocks * block_size", p.max_blocks * p.block_size);
  if (p.query_start == nullptr && p.num_rows != p.num_seqs) {
    throw InvalidArgumentError("paged_attention: num_rows=" + std::to_string(p.num_rows) +
                               " must equal num_seqs=" + std::to_string(p.num_seqs) +
                               " when query_start is null (one decode row per sequence)");
  }
  if (p.num_rows > 0 && p.num_seqs == 0) {
    throw InvalidArgumentError("paged_attention: num_rows=" + std::to_string(p.num_rows) + " rows but num_seqs=0");
  }
  check_not_null(where, "out", p.out);
  check_not_null(where, "query", p.query);
  check_not_null(where, "key_cache", p.key_cache);
  check_not_null(where, "value_cache", p.value_cache);
  check_not_null(where, "block_tables", p.block_tables);
  check_not_null(where, "context_lens", p.context_lens);
  check_aligned(where, "out", p.out, 16);
  check_aligned(where, "query", p.query, 16);
  check_aligned(where, "key_cache", p.key_cache, 16);
  check_aligned(where, "value_cache", p.value_cache, 16);
}

void paged_attention(const PagedAttentionProblem& p, cudaStream_t stream) {
  check_paged_attention_problem(p);
  if (p.num_rows == 0) return;
  switch (p.dtype) {
    case DType::kFloat32: dispatch_head_dim<float>(p, stream); break;
    case DType::kFloat16: dispatch_head_dim<__half>(p, stream); break;
    case DType::kBFloat16: dispatch_head_dim<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace infercept::cuda
