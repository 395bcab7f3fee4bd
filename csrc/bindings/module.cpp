// posenc_fast._C: the op families' method tables plus what the build and the driver
// tell (cuda_version, cuda_archs, driver_version()).
#include <cuda_runtime.h>

#include "launch_plan.h"

namespace {

PyObject* driver_version(PyObject*, PyObject*) {
  int v = 0;  // stays 0 when no driver is installed
  PyObject* ok = posenc_bind::call_core([&] { POSENC_CUDA_CHECK(cudaDriverGetVersion(&v)); }, false);
  if (!ok) return nullptr;
  Py_DECREF(ok);
  return PyLong_FromLong(v);
}

PyMethodDef module_methods[] = {
    {"driver_version", driver_version, METH_NOARGS,
     "CUDA version the installed driver supports (e.g. 13000), 0 without a driver"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "posenc_fast CUDA kernels (torch-agnostic: raw pointers, strides, dtype codes, streams)", -1,
    module_methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&module_def);
  if (!m) return nullptr;
  if (PyModule_AddStringConstant(m, "cuda_version", POSENC_FAST_CUDA_VERSION) < 0 ||  // toolkit it was built with
      PyModule_AddStringConstant(m, "cuda_archs", POSENC_FAST_CUDA_ARCHS) < 0 ||
      // Each family's functions live in csrc/bindings/<family>.cpp.
      PyModule_AddFunctions(m, posenc_bind::pyramid_pos_level_add_methods()) < 0 ||
      PyModule_AddFunctions(m, posenc_bind::rope_methods()) < 0 ||
      PyModule_AddFunctions(m, posenc_bind::qkv_proj_methods()) < 0 ||
      PyModule_AddFunctions(m, posenc_bind::pos_embed_add_methods()) < 0 ||
      PyModule_AddFunctions(m, posenc_bind::launch_plan_methods()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
