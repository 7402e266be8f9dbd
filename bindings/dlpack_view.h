#pragma once
// Tensor arguments taken through DLPack, so that the binding reads torch (or numpy, or any
// producer's) tensors without linking the framework. The structs below are the DLPack C ABI
// as published in the DLPack specification, v0.8 (dmlc/dlpack, include/dlpack/dlpack.h;
// DLPack 1.x keeps this DLTensor inside DLManagedTensorVersioned): declared here from the
// spec, only the parts the binding reads, under our own names.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>

#include "infercept/tensor_view.h"

namespace dlpack_abi {

enum DeviceType : int32_t { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3 };
enum DataTypeCode : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };

struct DLDevice {
  int32_t device_type;  // a DeviceType
  int32_t device_id;
};

struct DLDataType {
  uint8_t code;  // a DataTypeCode
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;    // [ndim]
  int64_t* strides;  // [ndim] in elements, or null for compact row-major
  uint64_t byte_offset;
};

// What a "dltensor" capsule points to. The consumer that takes it renames the capsule
// "used_dltensor" and calls deleter (when not null) once it is done with the memory.
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

}  // namespace dlpack_abi

/// One tensor argument borrowed for the length of a binding call: `object` is a DLPack
/// capsule or has __dlpack__ (torch tensors, numpy arrays). Takes the capsule, holds the
/// producer's tensor alive and releases it on destruction (construct and destroy with the GIL).
/// Throws InvalidArgumentError (a ValueError) naming `name` when the object is not a tensor,
/// cannot be exported, or has an element type or rank no TensorView holds.
class DLPackView {
 public:
  DLPackView(pybind11::handle object, const char* name);
  DLPackView(const DLPackView&) = delete;
  DLPackView& operator=(const DLPackView&) = delete;

  const infercept::TensorView& view() const { return view_; }

 private:
  struct Release {
    void operator()(dlpack_abi::DLManagedTensor* managed) const;
  };
  std::unique_ptr<dlpack_abi::DLManagedTensor, Release> managed_;
  infercept::TensorView view_;
};
