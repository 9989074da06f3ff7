// The Python module coupled_mamba_ext._C. Importing it loads this library, whose static
// initialisers (TORCH_LIBRARY in coupled_scan.cpp, TORCH_LIBRARY_IMPL in csrc/cpu and
// csrc/cuda) register the operators with torch's dispatcher; Python then reaches them as
// torch.ops.coupled_mamba.*. The module itself only carries constants that describe the
// build, which coupled_mamba_ext.ops reads. Written against the plain Python C API rather
// than pybind11, which took 16 s to compile for these few lines.
#include <Python.h>

#include "coupled_mamba/params.h"

#ifndef COUPLED_MAMBA_TORCH_VERSION
#define COUPLED_MAMBA_TORCH_VERSION "unknown"
#endif
#ifndef COUPLED_MAMBA_CUDA_ARCHS
#define COUPLED_MAMBA_CUDA_ARCHS ""
#endif
#ifdef COUPLED_MAMBA_WITH_CUDA
#define COUPLED_MAMBA_HAS_CUDA 1
#else
#define COUPLED_MAMBA_HAS_CUDA 0
#endif

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of coupled_mamba_ext; the operators are torch.ops.coupled_mamba.*.",
    -1,       // no per-module state
    nullptr,  // no functions, only the constants added below
};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const bool failed =
      // Time steps between the coupled states that forward saves for backward.
      PyModule_AddIntConstant(module, "CHUNK_LEN", coupled_mamba::kChunkLen) < 0 ||
      PyModule_AddIntConstant(module, "MAX_DSTATE", coupled_mamba::kMaxDState) < 0 ||
      PyModule_AddIntConstant(module, "MAX_MODALITIES", coupled_mamba::kMaxModalities) < 0 ||
      // The torch this library was compiled against, and whether (for which archs, ";"-
      // separated) it contains the CUDA kernels.
      PyModule_AddStringConstant(module, "TORCH_VERSION", COUPLED_MAMBA_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "WITH_CUDA", COUPLED_MAMBA_HAS_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", COUPLED_MAMBA_CUDA_ARCHS) < 0;
  if (failed) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
