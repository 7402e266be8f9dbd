// Tensor adapters of the paged-KV launchers (attention_kernels.h): checks of each TensorView,
// the tensors' device made current, then the raw-pointer problem. Host code only.
#include <cstdint>
#include <string>

#include "attention_kernels.h"
#include "cuda_check.h"
#include "infercept/attention_args.h"
#include "infercept/errors.h"
#include "infercept/tensor_view.h"

namespace infercept::cuda {
namespace {

// The element type that sets a call's dtype, as the launchers' tag.
DType kernel_dtype(const char* op, const char* name, const TensorView& tensor) {
  if (tensor.device.type != DeviceType::kCuda) {
    throw InvalidArgumentError(std::string(op) + ": " + name + " is on " +
                               to_string(tensor.device) + ", expected a CUDA device");
  }
  switch (tensor.dtype) {
    case ScalarType::kFloat32: return DType::kFloat32;
    case ScalarType::kFloat16: return DType::kFloat16;
    case ScalarType::kBFloat16: return DType::kBFloat16;
    default:
      throw InvalidArgumentError(std::string(op) + ": " + name + " is " +
                                 to_string(tensor.dtype) +
                                 ", expected float32, float16 or bfloat16");
  }
}

// Launches go to the current device: for the call it is the tensors' one (torch's CUDAGuard).
class DeviceGuard {
 public:
  explicit DeviceGuard(int32_t device) {
    INFERCEPT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) INFERCEPT_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);  // no throw from a destructor; nothing to undo
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace

void write_kv_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                    const TensorView& value_cache, const TensorView& slot_mapping,
                    cudaStream_t stream) {
  constexpr const char* op = "write_kv_cache";
  KvWriteProblem p;
  p.dtype = kernel_dtype(op, "key_cache", key_cache);
  const Device device = key_cache.device;
  const PagedCacheSizes cache =
      check_paged_caches(op, key_cache, value_cache, key_cache.dtype, device);
  check_ndim(op, "key", key, 3, "[num_tokens, num_kv_heads, head_dim]");
  p.num_tokens = key.shape[0];
  check_tensor(op, "key", key, key_cache.dtype, device,
               {p.num_tokens, cache.num_kv_heads, cache.head_dim});
  check_tensor(op, "value", value, key_cache.dtype, device,
               {p.num_tokens, cache.num_kv_heads, cache.head_dim});
  check_tensor(op, "slot_mapping", slot_mapping, ScalarType::kInt64, device, {p.num_tokens});
  p.key = key.data;
  p.value = value.data;
  p.key_cache = key_cache.data;
  p.value_cache = value_cache.data;
  p.slot_mapping = slot_mapping.data_as<const int64_t>();
  p.num_kv_heads = cache.num_kv_heads;
  p.head_dim = cache.head_dim;
  p.block_size = cache.block_size;
  p.num_blocks = cache.num_blocks;
  const DeviceGuard guard(device.index);
  write_kv_cache(p, stream);
}

void paged_attention(const TensorView& out, const TensorView& query, const TensorView& key_cache,
                     const TensorView& value_cache, const TensorView& block_tables,
                     const TensorView& context_lens, const TensorView* query_start, float scale,
                     cudaStream_t stream) {
  constexpr const char* op = "paged_attention";
  PagedAttentionProblem p;
  p.dtype = kernel_dtype(op, "query", query);
  const AttentionSizes s = check_attention_args(op, out, query, key_cache, value_cache,
                                                block_tables, context_lens, query.dtype,
                                                query.device);
  if (query_start != nullptr) {
    check_tensor(op, "query_start", *query_start, ScalarType::kInt32, query.device,
                 {s.num_seqs + 1});
    p.query_start = query_start->data_as<const int32_t>();
  }
  p.out = out.data;
  p.query = query.data;
  p.key_cache = key_cache.data;
  p.value_cache = value_cache.data;
  p.block_tables = block_tables.data_as<const int32_t>();
  p.context_lens = context_lens.data_as<const int32_t>();
  p.num_rows = s.num_rows;
  copy_sizes(s, p);
  p.scale = scale;
  const DeviceGuard guard(query.device.index);
  paged_attention(p, stream);
}

}  // namespace infercept::cuda
