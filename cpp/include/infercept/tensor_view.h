#pragma once
// A framework-free view of one tensor argument: data pointer, element type, device, shape and
// strides. The kernel adapters (cpu_attention.h, cuda/attention_kernels.h) check views like
// these before they hand raw pointers to a kernel; the binding builds them from DLPack
// capsules, C++ tests over plain vectors. Nothing here owns memory.
#include <cstdint>
#include <initializer_list>
#include <string>

namespace infercept {

/// Element types the kernels take or that an argument may wrongly carry.
enum class ScalarType : int32_t {
  kFloat32, kFloat16, kBFloat16, kFloat64, kInt64, kInt32, kInt16, kInt8, kUInt8, kBool
};

/// "float32", "bfloat16", "int64", ...
std::string to_string(ScalarType dtype);

/// Device kinds, numbered as DLPack's DLDeviceType so that any producer's device can be held
/// (and named in an error) even when no enumerator below spells it.
enum class DeviceType : int32_t { kCpu = 1, kCuda = 2, kCudaHost = 3 };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int32_t index = 0;
  bool operator==(const Device& other) const { return type == other.type && index == other.index; }
  bool operator!=(const Device& other) const { return !(*this == other); }
};

/// "cpu", "cuda:1", "cuda_host", "DLPack device type 10:0".
std::string to_string(Device device);

/// One tensor argument. Strides count elements, as in torch and DLPack.
struct TensorView {
  static constexpr int32_t kMaxDims = 8;
  void* data = nullptr;  ///< first element
  ScalarType dtype = ScalarType::kFloat32;
  Device device;
  int32_t ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};

  int64_t numel() const;
  /// Dense row-major: every dimension of size > 1 has the stride of the dimensions after it.
  bool is_contiguous() const;
  /// Bytes from the first to one past the last element (0 when empty); strides >= 0 assumed.
  int64_t span_bytes() const;
  template <typename T>
  T* data_as() const {
    return static_cast<T*>(data);
  }
};

/// Bytes of one element.
int64_t element_size(ScalarType dtype);

/// A dense row-major view of `data` (C++ tests and microbenchmarks). Throws
/// InvalidArgumentError past kMaxDims dimensions.
TensorView contiguous_view(void* data, ScalarType dtype, Device device,
                           std::initializer_list<int64_t> shape);

/// Checks of one argument of kernel `op`. Each throws InvalidArgumentError "op: name ...",
/// naming the value found and the one expected.
///
/// check_ndim: `tensor` has `ndim` dimensions; `layout` names them, e.g. "[num_seqs, max_blocks]".
void check_ndim(const char* op, const char* name, const TensorView& tensor, int32_t ndim,
                const char* layout);
/// check_tensor: on `device`, of `dtype`, of exactly `shape`, and contiguous (the kernels index
/// raw memory), checked in that order.
void check_tensor(const char* op, const char* name, const TensorView& tensor, ScalarType dtype,
                  Device device, std::initializer_list<int64_t> shape);
/// check_disjoint: `written` shares no byte with `read` (a kernel writing one while reading the
/// other would read its own output).
void check_disjoint(const char* op, const char* written_name, const TensorView& written,
                    const char* read_name, const TensorView& read);

}  // namespace infercept
