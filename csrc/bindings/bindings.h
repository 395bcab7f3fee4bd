// Python binding of the torch-agnostic core, written against CPython's limited API
// (stable ABI, Py_LIMITED_API = 3.10, set by the build): one compiled module serves
// every CPython from 3.10 on. Each op family's functions live in
// csrc/bindings/<family>.cpp as a method table; module.cpp assembles posenc_fast._C.
//
// Calling convention (what the op layer passes): pointers and stream handles as
// ints, sizes as ints, strides as lists (or tuples) of ints, weights as floats,
// flags as bools; positional or by keyword. METH_FASTCALL keeps the per-call cost
// at a few dozen nanoseconds: the sampling loop calls these for 3-5 us kernels.
#pragma once

// Every build of the binding (CMakeLists.txt, the emulation test) targets this ABI.
#if !defined(Py_LIMITED_API) || Py_LIMITED_API != 0x030A0000
#error "compile the binding with -DPy_LIMITED_API=0x030A0000 (the CPython 3.10 stable ABI)"
#endif

#include <Python.h>

#include <cstdint>
#include <exception>
#include <new>
#include <stdexcept>

#include "posenc_fast/common.h"

namespace posenc_bind {

using FastCall = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*);

// A METH_FASTCALL | METH_KEYWORDS function as the PyCFunction a PyMethodDef holds.
inline PyCFunction method(FastCall f) { return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f)); }
constexpr int kFastCall = METH_FASTCALL | METH_KEYWORDS;

// The arguments of one call, matched to the parameter names (positional first,
// then keywords) and converted one at a time. The first failure sets a TypeError
// (ValueError for a stride list of the wrong length) naming the function and the
// argument; later conversions then return zeros, so a binding converts everything
// and checks failed() once.
class Args {
 public:
  static constexpr int kMaxParams = 32;

  template <int N>
  Args(const char* fn, const char* const (&names)[N], PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames)
      : fn_(fn), names_(names) {
    static_assert(N <= kMaxParams, "raise Args::kMaxParams");
    match(N, args, nargs, kwnames);
  }

  bool failed() const { return failed_; }
  PyObject* object(int i) const { return slots_[i]; }  // borrowed
  void* ptr(int i);
  int64_t i64(int i);
  int i32(int i);
  float f32(int i);
  bool flag(int i);
  // Exactly n ints into out[0..n).
  void strides(int i, int64_t* out, int n, const char* dims = nullptr);

 private:
  void match(int n, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames);
  void fail(PyObject* type, int i, const char* what);

  const char* fn_;
  const char* const* names_;
  PyObject* slots_[kMaxParams] = {};
  bool failed_ = false;
};

inline void Args::fail(PyObject* type, int i, const char* what) {
  if (!failed_) {
    PyErr_Clear();  // a conversion's own error, replaced by one that names the argument
    PyErr_Format(type, "%s(): argument '%s' (position %d) %s", fn_, names_[i], i + 1, what);
  }
  failed_ = true;
}

inline void Args::match(int n, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  const Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
  if (nargs > n) {
    PyErr_Format(PyExc_TypeError, "%s() takes %d arguments (%zd given)", fn_, n, nargs + nkw);
    failed_ = true;
    return;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) slots_[i] = args[i];
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* key = PyTuple_GetItem(kwnames, k);
    int i = static_cast<int>(nargs);
    while (i < n && PyUnicode_CompareWithASCIIString(key, names_[i]) != 0) ++i;
    if (i == n || slots_[i]) {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated keyword argument %R", fn_, key);
      failed_ = true;
      return;
    }
    slots_[i] = args[nargs + k];
  }
  for (int i = 0; i < n; ++i) {
    if (!slots_[i]) {
      PyErr_Format(PyExc_TypeError, "%s() missing argument '%s' (position %d)", fn_, names_[i], i + 1);
      failed_ = true;
      return;
    }
  }
}

inline void* Args::ptr(int i) {
  if (failed_) return nullptr;
  // Unsigned: a data pointer or stream handle is never negative.
  unsigned long long v = PyLong_AsUnsignedLongLong(slots_[i]);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) fail(PyExc_TypeError, i, "must be an int address >= 0");
  return reinterpret_cast<void*>(static_cast<std::uintptr_t>(v));
}

inline int64_t Args::i64(int i) {
  if (failed_) return 0;
  long long v = PyLong_AsLongLong(slots_[i]);
  if (v == -1 && PyErr_Occurred()) fail(PyExc_TypeError, i, "must be an int in the int64 range");
  return v;
}

inline int Args::i32(int i) {
  int64_t v = i64(i);
  if (!failed_ && (v < INT32_MIN || v > INT32_MAX)) fail(PyExc_TypeError, i, "must be an int in the int32 range");
  return static_cast<int>(v);
}

inline float Args::f32(int i) {
  if (failed_) return 0.f;
  double v = PyFloat_AsDouble(slots_[i]);
  if (v == -1.0 && PyErr_Occurred()) fail(PyExc_TypeError, i, "must be a float");
  return static_cast<float>(v);
}

inline bool Args::flag(int i) {
  if (failed_) return false;
  int v = PyObject_IsTrue(slots_[i]);
  if (v < 0) fail(PyExc_TypeError, i, "must be a bool");
  return v > 0;
}

inline void Args::strides(int i, int64_t* out, int n, const char* dims) {
  if (failed_) return;
  PyObject* seq = slots_[i];
  const bool list = PyList_Check(seq), tuple = !list && PyTuple_Check(seq);
  if (!list && !tuple) {
    fail(PyExc_TypeError, i, "must be a list or tuple of ints");
    return;
  }
  const Py_ssize_t len = list ? PyList_Size(seq) : PyTuple_Size(seq);
  if (len != n) {
    // A ValueError like the core's argument checks: the op layer passed a wrong shape.
    PyErr_Format(PyExc_ValueError, "posenc_fast: %s: %s needs %d entries%s%s%s, got %zd", fn_, names_[i], n,
                 dims ? " (" : "", dims ? dims : "", dims ? ")" : "", len);
    failed_ = true;
    return;
  }
  for (int d = 0; d < n; ++d) {
    long long v = PyLong_AsLongLong(list ? PyList_GetItem(seq, d) : PyTuple_GetItem(seq, d));  // borrowed
    if (v == -1 && PyErr_Occurred()) {
      fail(PyExc_TypeError, i, "must hold ints in the int64 range");
      return;
    }
    out[d] = v;
  }
}

// Runs `launch` (a call into the core), optionally without the GIL, and turns a C++
// exception into the Python one: std::invalid_argument -> ValueError (argument
// errors, before any CUDA call), std::bad_alloc -> MemoryError, anything else ->
// RuntimeError (CUDA errors). Returns None, or null with the error set.
template <class F>
PyObject* call_core(F&& launch, bool release_gil) {
  std::exception_ptr err;
  PyThreadState* saved = release_gil ? PyEval_SaveThread() : nullptr;
  try {
    launch();
  } catch (...) {
    err = std::current_exception();
  }
  if (saved) PyEval_RestoreThread(saved);
  if (!err) Py_RETURN_NONE;
  try {
    std::rethrow_exception(err);
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "posenc_fast: unknown C++ exception");
  }
  return nullptr;
}

inline posenc::DType as_dtype(int code) {
  POSENC_CHECK_ARG(code >= 0 && code <= 2, "dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<posenc::DType>(code);
}
inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Null-terminated method tables of the op families.
PyMethodDef* pyramid_pos_level_add_methods();
PyMethodDef* rope_methods();
PyMethodDef* qkv_proj_methods();
PyMethodDef* pos_embed_add_methods();

}  // namespace posenc_bind
