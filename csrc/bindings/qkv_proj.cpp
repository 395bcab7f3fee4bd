#include "posenc_fast/qkv_proj.h"

#include "bindings.h"

namespace posenc_bind {

namespace {

// coords (B|1, L, A) strides (batch, token, axis) and freqs (H|1, A, rot_pairs)
// strides (head, axis), or with 0 axes a cos/sin table (see qkv_proj.h), the
// rotating pairs per head and the pairing, from the arguments at `first` ..
// first + 6; a null coords pointer means no rotation.
posenc::QkvRopeArgs rope_args(Args& p, int first) {
  posenc::QkvRopeArgs r{};
  r.coords = static_cast<const float*>(p.ptr(first));
  p.strides(first + 1, r.coords_stride, 3, "batch, token, axis");
  r.freqs = static_cast<const float*>(p.ptr(first + 2));
  p.strides(first + 3, r.freqs_stride, 2, "head, axis");
  r.num_axes = p.i32(first + 4);
  r.rot_pairs = p.i32(first + 5);
  r.half_pairing = p.flag(first + 6);
  return r;
}

PyObject* fwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "qkv", "qkv_row_stride", "bias", "dtype", "q_scale", "coords", "coords_stride", "freqs", "freqs_stride",
      "num_axes", "rot_pairs", "half_pairing", "q", "q_stride", "k", "k_stride", "v", "v_stride", "rstd", "B", "L",
      "H", "D",
      "device", "stream"};
  Args p("qkv_proj_fwd", names, args, nargs, kwnames);
  posenc::QkvProjFwdArgs a{};
  a.qkv = p.ptr(0); a.qkv_row_stride = p.i64(1);
  a.bias = p.ptr(2); const int dtype = p.i32(3);
  a.q_scale = static_cast<const float*>(p.ptr(4));
  a.rope = rope_args(p, 5);
  a.q = p.ptr(12); p.strides(13, a.q_stride, 3, "B, H, L");
  a.k = p.ptr(14); p.strides(15, a.k_stride, 3, "B, H, L");
  a.v = p.ptr(16); p.strides(17, a.v_stride, 3, "B, H, L");
  a.rstd = static_cast<float*>(p.ptr(18));
  a.B = p.i64(19); a.L = p.i64(20); a.H = p.i64(21); a.D = p.i64(22);
  const int device = p.i32(23);
  cudaStream_t stream = as_stream(p.ptr(24));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.dtype = as_dtype(dtype);
    posenc::qkv_proj_fwd(a, device, stream);
  }, /*release_gil=*/true);
}

PyObject* rows_per_chunk(PyObject*, PyObject*) {
  return PyLong_FromLongLong(posenc::qkv_proj_bwd_rows_per_chunk());
}

PyObject* bwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "dq", "dq_stride", "dk", "dk_stride", "dv", "dv_stride", "q", "k", "dtype", "rstd", "q_scale", "coords",
      "coords_stride", "freqs", "freqs_stride", "num_axes", "rot_pairs", "half_pairing", "dqkv", "dbias_part",
      "dscale_part", "dfreqs_part", "B", "L", "H", "D", "device", "stream"};
  Args p("qkv_proj_bwd", names, args, nargs, kwnames);
  posenc::QkvProjBwdArgs a{};
  a.dq = p.ptr(0); p.strides(1, a.dq_stride, 4, "B, H, L, D");
  a.dk = p.ptr(2); p.strides(3, a.dk_stride, 4, "B, H, L, D");
  a.dv = p.ptr(4); p.strides(5, a.dv_stride, 4, "B, H, L, D");
  a.q = p.ptr(6); a.k = p.ptr(7); const int dtype = p.i32(8);
  a.rstd = static_cast<const float*>(p.ptr(9));
  a.q_scale = static_cast<const float*>(p.ptr(10));
  a.rope = rope_args(p, 11);
  a.dqkv = p.ptr(18);
  a.dbias_part = static_cast<float*>(p.ptr(19));
  a.dscale_part = static_cast<float*>(p.ptr(20));
  a.dfreqs_part = static_cast<float*>(p.ptr(21));
  a.B = p.i64(22); a.L = p.i64(23); a.H = p.i64(24); a.D = p.i64(25);
  const int device = p.i32(26);
  cudaStream_t stream = as_stream(p.ptr(27));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.dtype = as_dtype(dtype);
    posenc::qkv_proj_bwd(a, device, stream);
  }, /*release_gil=*/true);
}

}  // namespace

PyMethodDef* qkv_proj_methods() {
  static PyMethodDef methods[] = {
      {"qkv_proj_fwd", method(fwd), kFastCall,
       "packed qkv GEMM output -> bias, l2 norm, q_scale, rope (angles or a cos/sin table, all or the first "
       "rot_pairs pairs), (B, H, L, D) q, k, v or KV-cache windows "
       "(see qkv_proj.h)"},
      {"qkv_proj_bwd_rows_per_chunk", rows_per_chunk, METH_NOARGS,
       "tokens per chunk of the backward's partial sums"},
      {"qkv_proj_bwd", method(bwd), kFastCall,
       "dq, dk, dv -> packed dqkv and partial sums of dbias, dq_scale, dfreqs (see qkv_proj.h)"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace posenc_bind
