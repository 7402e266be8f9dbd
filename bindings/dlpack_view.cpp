#include "dlpack_view.h"

#include <string>

#include "infercept/errors.h"

namespace py = pybind11;
using dlpack_abi::DLDataType;
using dlpack_abi::DLManagedTensor;
using infercept::InvalidArgumentError;
using infercept::ScalarType;

namespace {

// infercept::DeviceType is numbered as DLPack's DLDeviceType, so a device converts as is.
static_assert(static_cast<int32_t>(infercept::DeviceType::kCpu) == dlpack_abi::kDLCPU);
static_assert(static_cast<int32_t>(infercept::DeviceType::kCuda) == dlpack_abi::kDLCUDA);
static_assert(static_cast<int32_t>(infercept::DeviceType::kCudaHost) == dlpack_abi::kDLCUDAHost);

[[noreturn]] void fail(const char* name, const std::string& what) {
  throw InvalidArgumentError(std::string(name) + " " + what);
}

struct KnownType {
  uint8_t code, bits;
  ScalarType type;
};

constexpr KnownType kKnownTypes[] = {
    {dlpack_abi::kDLFloat, 32, ScalarType::kFloat32},
    {dlpack_abi::kDLFloat, 16, ScalarType::kFloat16},
    {dlpack_abi::kDLBfloat, 16, ScalarType::kBFloat16},
    {dlpack_abi::kDLFloat, 64, ScalarType::kFloat64},
    {dlpack_abi::kDLInt, 64, ScalarType::kInt64},
    {dlpack_abi::kDLInt, 32, ScalarType::kInt32},
    {dlpack_abi::kDLInt, 16, ScalarType::kInt16},
    {dlpack_abi::kDLInt, 8, ScalarType::kInt8},
    {dlpack_abi::kDLUInt, 8, ScalarType::kUInt8},
    {dlpack_abi::kDLBool, 8, ScalarType::kBool},
};

ScalarType scalar_type(const char* name, DLDataType dtype) {
  for (const KnownType& known : kKnownTypes) {
    if (dtype.code == known.code && dtype.bits == known.bits && dtype.lanes == 1) return known.type;
  }
  fail(name, "has DLPack dtype code " + std::to_string(dtype.code) + ", " +
                 std::to_string(dtype.bits) + " bits, " + std::to_string(dtype.lanes) +
                 " lanes, which no kernel takes");
}

// The capsule of `object`: itself, or what its __dlpack__() returns. torch exports without
// synchronising streams by default; the CUDA kernels run on the caller's current stream.
py::object capsule_of(py::handle object, const char* name) {
  if (PyCapsule_CheckExact(object.ptr())) return py::reinterpret_borrow<py::object>(object);
  if (!py::hasattr(object, "__dlpack__")) {
    fail(name, "is a " + std::string(Py_TYPE(object.ptr())->tp_name) +
                   ", expected a tensor (an object with __dlpack__) or a DLPack capsule");
  }
  try {
    return object.attr("__dlpack__")();
  } catch (py::error_already_set& error) {
    // The producer's reason without the traceback that what() appends.
    fail(name, "cannot be exported through DLPack: " +
                   py::str(error.type().attr("__name__")).cast<std::string>() + ": " +
                   py::str(error.value()).cast<std::string>());
  }
}

}  // namespace

void DLPackView::Release::operator()(DLManagedTensor* managed) const {
  if (managed->deleter != nullptr) managed->deleter(managed);
}

DLPackView::DLPackView(py::handle object, const char* name) {
  const py::object capsule = capsule_of(object, name);
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
    fail(name, "is not an unused DLPack capsule named \"dltensor\" (already consumed, or a "
               "versioned capsule)");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  // Renamed, the capsule's destructor no longer frees the tensor: managed_ now does.
  if (PyCapsule_SetName(capsule.ptr(), "used_dltensor") != 0) throw py::error_already_set();
  managed_.reset(managed);
  const dlpack_abi::DLTensor& tensor = managed_->dl_tensor;
  if (tensor.ndim < 0 || tensor.ndim > infercept::TensorView::kMaxDims) {
    fail(name, "has " + std::to_string(tensor.ndim) + " dimensions, more than the kernels' " +
                   std::to_string(infercept::TensorView::kMaxDims));
  }
  view_.data = static_cast<char*>(tensor.data) + tensor.byte_offset;
  view_.dtype = scalar_type(name, tensor.dtype);
  view_.device = {static_cast<infercept::DeviceType>(tensor.device.device_type),
                  tensor.device.device_id};
  view_.ndim = tensor.ndim;
  int64_t stride = 1;
  for (int32_t i = tensor.ndim - 1; i >= 0; --i) {
    view_.shape[i] = tensor.shape[i];
    view_.strides[i] = tensor.strides != nullptr ? tensor.strides[i] : stride;
    stride *= tensor.shape[i];
  }
}
