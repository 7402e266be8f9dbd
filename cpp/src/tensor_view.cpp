#include "infercept/tensor_view.h"

#include <string>

#include "infercept/errors.h"

namespace infercept {
namespace {

std::string dims(const int64_t* values, int32_t ndim) {
  std::string text = "[";
  for (int32_t i = 0; i < ndim; ++i) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + "]";
}

[[noreturn]] void fail(const char* op, const char* name, const std::string& what) {
  throw InvalidArgumentError(std::string(op) + ": " + name + " " + what);
}

}  // namespace

std::string to_string(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::kFloat32: return "float32";
    case ScalarType::kFloat16: return "float16";
    case ScalarType::kBFloat16: return "bfloat16";
    case ScalarType::kFloat64: return "float64";
    case ScalarType::kInt64: return "int64";
    case ScalarType::kInt32: return "int32";
    case ScalarType::kInt16: return "int16";
    case ScalarType::kInt8: return "int8";
    case ScalarType::kUInt8: return "uint8";
    case ScalarType::kBool: return "bool";
  }
  return "dtype " + std::to_string(static_cast<int32_t>(dtype));
}

std::string to_string(Device device) {
  switch (device.type) {
    case DeviceType::kCpu: return "cpu";
    case DeviceType::kCuda: return "cuda:" + std::to_string(device.index);
    case DeviceType::kCudaHost: return "cuda_host";
  }
  return "DLPack device type " + std::to_string(static_cast<int32_t>(device.type)) + ":" +
         std::to_string(device.index);
}

int64_t element_size(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::kFloat64:
    case ScalarType::kInt64: return 8;
    case ScalarType::kFloat32:
    case ScalarType::kInt32: return 4;
    case ScalarType::kFloat16:
    case ScalarType::kBFloat16:
    case ScalarType::kInt16: return 2;
    case ScalarType::kInt8:
    case ScalarType::kUInt8:
    case ScalarType::kBool: return 1;
  }
  throw InvalidArgumentError(to_string(dtype) + " has no element size");
}

int64_t TensorView::numel() const {
  int64_t count = 1;
  for (int32_t i = 0; i < ndim; ++i) count *= shape[i];
  return count;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int32_t i = ndim - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

int64_t TensorView::span_bytes() const {
  if (numel() == 0) return 0;
  int64_t last = 0;
  for (int32_t i = 0; i < ndim; ++i) last += (shape[i] - 1) * strides[i];
  return (last + 1) * element_size(dtype);
}

TensorView contiguous_view(void* data, ScalarType dtype, Device device,
                           std::initializer_list<int64_t> shape) {
  if (shape.size() > static_cast<size_t>(TensorView::kMaxDims)) {
    throw InvalidArgumentError("contiguous_view: " + std::to_string(shape.size()) +
                               " dimensions, more than kMaxDims=" +
                               std::to_string(TensorView::kMaxDims));
  }
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.device = device;
  view.ndim = static_cast<int32_t>(shape.size());
  int32_t i = 0;
  for (int64_t size : shape) view.shape[i++] = size;
  int64_t stride = 1;
  for (i = view.ndim - 1; i >= 0; --i) {
    view.strides[i] = stride;
    stride *= view.shape[i];
  }
  return view;
}

void check_ndim(const char* op, const char* name, const TensorView& tensor, int32_t ndim,
                const char* layout) {
  if (tensor.ndim != ndim) {
    fail(op, name, "has shape " + dims(tensor.shape, tensor.ndim) + ", expected " +
                       std::to_string(ndim) + " dimensions " + layout);
  }
}

void check_tensor(const char* op, const char* name, const TensorView& tensor, ScalarType dtype,
                  Device device, std::initializer_list<int64_t> shape) {
  if (tensor.device != device) {
    fail(op, name, "is on " + to_string(tensor.device) + ", expected " + to_string(device));
  }
  if (tensor.dtype != dtype) {
    fail(op, name, "is " + to_string(tensor.dtype) + ", expected " + to_string(dtype));
  }
  const TensorView expected = contiguous_view(nullptr, dtype, device, shape);
  bool same_shape = tensor.ndim == expected.ndim;
  for (int32_t i = 0; same_shape && i < tensor.ndim; ++i) {
    same_shape = tensor.shape[i] == expected.shape[i];
  }
  if (!same_shape) {
    fail(op, name, "has shape " + dims(tensor.shape, tensor.ndim) + ", expected " +
                       dims(expected.shape, expected.ndim));
  }
  if (!tensor.is_contiguous()) {
    fail(op, name, "with shape " + dims(tensor.shape, tensor.ndim) + " has strides " +
                       dims(tensor.strides, tensor.ndim) + ", expected contiguous strides " +
                       dims(expected.strides, expected.ndim));
  }
}

void check_disjoint(const char* op, const char* written_name, const TensorView& written,
                    const char* read_name, const TensorView& read) {
  const auto w = reinterpret_cast<std::uintptr_t>(written.data);
  const auto r = reinterpret_cast<std::uintptr_t>(read.data);
  const auto w_bytes = static_cast<std::uintptr_t>(written.span_bytes());
  const auto r_bytes = static_cast<std::uintptr_t>(read.span_bytes());
  if (w_bytes > 0 && r_bytes > 0 && w < r + r_bytes && r < w + w_bytes) {
    fail(op, written_name, std::string("overlaps ") + read_name +
                               " in memory; the kernel writes it while reading " + read_name);
  }
}

}  // namespace infercept
