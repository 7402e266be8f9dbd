#include "device_info.h"

#include <cuda_runtime.h>

namespace infercept::cuda {
namespace {

__global__ void write_value(int* out, int value) { *out = value; }

}  // namespace

int num_devices() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return count;
}

bool smoke_test(int value) {
  if (num_devices() == 0) return false;
  int* device_value = nullptr;
  if (cudaMalloc(&device_value, sizeof(int)) != cudaSuccess) return false;
  write_value<<<1, 1>>>(device_value, value);
  int host_value = ~value;
  bool ok = cudaMemcpy(&host_value, device_value, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  cudaFree(device_value);
  return ok && host_value == value;
}

}  // namespace infercept::cuda
