#include "posenc_fast/rope.h"

#include "bindings.h"

namespace posenc_bind {

namespace {

// A (B, H, L, D) tensor from its pointer and stride-list arguments at i, i + 1.
posenc::RopeTensor tensor4(Args& p, int i) {
  posenc::RopeTensor t;
  t.ptr = p.ptr(i);
  p.strides(i + 1, t.stride, 4, "B, H, L, D");
  return t;
}

PyObject* workspace_floats(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"B", "Hq", "Hk", "L", "D", "A", "per_head"};
  Args p("rope_workspace_floats", names, args, nargs, kwnames);
  const int B = p.i32(0), Hq = p.i32(1), Hk = p.i32(2), L = p.i32(3), D = p.i32(4), A = p.i32(5);
  const bool per_head = p.flag(6);
  if (p.failed()) return nullptr;
  return PyLong_FromSize_t(posenc::rope_workspace_floats(B, Hq, Hk, L, D, A, per_head));
}

PyObject* apply(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "q", "q_strides", "k", "k_strides", "q_out", "q_out_strides", "k_out", "k_out_strides", "q_saved",
      "q_saved_strides", "k_saved", "k_saved_strides", "dtype", "coords", "coord_strides", "freqs",
      "freq_strides", "B", "Hq", "Hk", "L", "D", "A", "per_head", "interleaved", "conjugate", "full_table",
      "workspace", "dfreqs", "device", "stream"};
  Args p("rope_apply", names, args, nargs, kwnames);
  posenc::RopeArgs a;
  a.x[0] = tensor4(p, 0);
  a.x[1] = tensor4(p, 2);
  a.out[0] = tensor4(p, 4);
  a.out[1] = tensor4(p, 6);
  a.saved[0] = tensor4(p, 8);
  a.saved[1] = tensor4(p, 10);
  const int dtype = p.i32(12);
  a.coords = static_cast<const float*>(p.ptr(13));
  p.strides(14, a.coord_stride, 3);
  a.freqs = static_cast<const float*>(p.ptr(15));
  p.strides(16, a.freq_stride, 3);
  a.B = p.i32(17); a.Hq = p.i32(18); a.Hk = p.i32(19); a.L = p.i32(20); a.D = p.i32(21); a.A = p.i32(22);
  a.per_head = p.flag(23); a.interleaved = p.flag(24); a.conjugate = p.flag(25); a.full_table = p.flag(26);
  a.workspace = static_cast<float*>(p.ptr(27));
  a.dfreqs = static_cast<float*>(p.ptr(28));
  const int device = p.i32(29);
  cudaStream_t stream = as_stream(p.ptr(30));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.dtype = as_dtype(dtype);
    posenc::rope_apply(a, device, stream);
  }, /*release_gil=*/false);
}

}  // namespace

PyMethodDef* rope_methods() {
  static PyMethodDef methods[] = {
      {"rope_workspace_floats", method(workspace_floats), kFastCall,
       "floats of fp32 workspace the d freqs reduction of rope_apply needs"},
      {"rope_apply", method(apply), kFastCall,
       "Rotates q and k (or only q when Hk == 0) into q_out / k_out (may alias them); with dfreqs also "
       "reduces d freqs from the saved outputs (q/k are then the output gradients)"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace posenc_bind
