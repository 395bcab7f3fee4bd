// Python module of one emulated op family: the family's real binding code
// (csrc/bindings/<family>.cpp, so the API is that of posenc_fast._C, limited API
// included) plus emulator controls. The build defines POSENC_EMU_MODULE (module
// name) and POSENC_EMU_METHODS (the family's posenc_bind::<family>_methods).
#include <sanitizer/common_interface_defs.h>

#include "launch_plan.h"

#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define EMU_STR2(a) #a
#define EMU_STR(a) EMU_STR2(a)

namespace {

PyObject* set_num_sms(PyObject*, PyObject* arg) {
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  emu_num_sms = static_cast<int>(n);
  Py_RETURN_NONE;
}

PyObject* set_report_path(PyObject*, PyObject* arg) {
  const char* path = PyUnicode_AsUTF8AndSize(arg, nullptr);
  if (!path) return nullptr;
  __sanitizer_set_report_path(path);
  Py_RETURN_NONE;
}

// The strings of ``items`` as a new Python list, ``items`` emptied.
template <class Container>
PyObject* take_strings(Container& items) {
  PyObject* out = PyList_New(0);
  for (const std::string& item : items) {
    PyObject* s = out ? PyUnicode_FromString(item.c_str()) : nullptr;
    if (!s || PyList_Append(out, s) < 0) {
      Py_XDECREF(s);
      Py_XDECREF(out);
      return nullptr;
    }
    Py_DECREF(s);
  }
  items.clear();
  return out;
}

PyObject* take_kernels(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> g(emu_kernels_mu);
  return take_strings(emu_kernels);
}

PyObject* set_dry(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  emu_dry = on;
  Py_RETURN_NONE;
}

PyObject* take_launches(PyObject*, PyObject*) { return take_strings(emu_launches); }

PyMethodDef emu_methods[] = {
    {"emu_set_num_sms", set_num_sms, METH_O, "SM count cudaDeviceGetAttribute reports"},
    {"emu_set_report_path", set_report_path, METH_O,
     "sanitizer reports go to files path.<pid> (the runtime ignores UBSAN_OPTIONS set after start-up)"},
    {"emu_take_kernels", take_kernels, METH_NOARGS,
     "names of the kernels (with template arguments) that ran since the last call"},
    {"emu_set_dry", set_dry, METH_O, "dry launches: record kernel|grid|block|smem, run nothing"},
    {"emu_take_launches", take_launches, METH_NOARGS,
     "the dry launches since the last call, as 'kernel|gx,gy,gz|bx,by,bz|smem' strings"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, EMU_STR(POSENC_EMU_MODULE), nullptr, -1, emu_methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC EMU_CAT(PyInit_, POSENC_EMU_MODULE)() {
  PyObject* m = PyModule_Create(&module_def);
  if (m && (PyModule_AddFunctions(m, posenc_bind::POSENC_EMU_METHODS()) < 0 ||
            PyModule_AddFunctions(m, posenc_bind::launch_plan_methods()) < 0))
    Py_CLEAR(m);
  return m;
}
