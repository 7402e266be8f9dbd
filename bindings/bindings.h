#pragma once
// Parts of the infercept._core module that live in their own files, one bind_* per file. Each
// is called once from PYBIND11_MODULE in core_module.cpp, after the errors and the BlockCopy
// type they use are registered.
#include <pybind11/pybind11.h>

/// ScheduledRequest, StepPlan (its StepBatch arrays as numpy views), StepResult, KvStateChange
/// and StepOutput: the records one step exchanges.
void bind_step(pybind11::module_& m);

/// SwapEngine (the interface), CpuSwapEngine, SwapStepStats and SwapCounters.
void bind_swap_engine(pybind11::module_& m);

/// paged_decode_attention (and cpu_attention_has_openmp): the native CPU decode kernel over
/// tensors taken through DLPack.
void bind_cpu_attention(pybind11::module_& m);

/// pack_linear_weight and cpu_linear: the native packed CPU linear kernel over tensors taken
/// through DLPack.
void bind_cpu_linear(pybind11::module_& m);

/// rms_norm, add_rms_norm, silu_mul and rotary_write_kv: the CPU decoder layer's small ops
/// (cpu_layer_ops.h) over tensors taken through DLPack.
void bind_cpu_layer_ops(pybind11::module_& m);

/// CpuDecoderLayer, CpuDecodeBatch and CpuDecoderScratch: a decode step's layer as one native
/// call (cpu_decoder_layer.h).
void bind_cpu_decoder_layer(pybind11::module_& m);

#ifdef INFERCEPT_WITH_CUDA
/// CudaSwapEngine, cuda_write_kv_cache and cuda_paged_attention (CUDA builds only).
void bind_cuda(pybind11::module_& m);
#endif
