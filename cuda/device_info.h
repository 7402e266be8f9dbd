#pragma once
// What the CUDA runtime sees. Compiled only when the CUDA backend is built; the rest of the
// backend (swap engine, KV-write and paged-attention kernels) builds on this target.

namespace infercept::cuda {

/// Number of CUDA devices visible to this process; 0 when the driver or device is missing
/// (never throws: the Python layer falls back to the CPU backend with a message).
int num_devices();

/// Runs a one-block kernel that writes `value` to device memory and reads it back; returns
/// true when the device round trip returns the value. Proves the toolchain and the driver.
bool smoke_test(int value);

}  // namespace infercept::cuda
