#pragma once
// Error checking for CUDA runtime calls and kernel launches: every call's return code is
// checked, and a failure becomes a typed infercept error naming the call, file and line (the
// binding maps infercept::Error subclasses to infercept._core.InferceptError).
#include <cuda_runtime.h>

#include <string>

#include "infercept/errors.h"

namespace infercept::cuda {

/// A CUDA runtime call or kernel launch failed (bad device pointer, no device, out of memory).
class CudaError : public Error {
 public:
  using Error::Error;
};

/// Throws CudaError when `status` is not cudaSuccess, naming `what` and where it was called.
inline void check_cuda(cudaError_t status, const char* what, const char* file, int line) {
  if (status != cudaSuccess) {
    throw CudaError(std::string(what) + " failed at " + file + ":" + std::to_string(line) +
                    ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
  }
}

}  // namespace infercept::cuda

#define INFERCEPT_CUDA_CHECK(expr) ::infercept::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)
// After a <<<...>>> launch: launch-configuration errors surface here, not at the next call.
#define INFERCEPT_CUDA_CHECK_LAUNCH(name) \
  ::infercept::cuda::check_cuda(cudaGetLastError(), name " launch", __FILE__, __LINE__)
