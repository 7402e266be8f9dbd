#pragma once
// Binding entry points defined in their own files and called from PYBIND11_MODULE in
// core_module.cpp: one function per file, each adding its part of infercept._core.
#include <pybind11/pybind11.h>

/// Adds paged_decode_attention (and cpu_attention_has_openmp): the native CPU decode kernel over
/// raw tensor addresses.
void bind_cpu_attention(pybind11::module_& m);
