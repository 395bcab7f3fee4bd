#include "posenc_fast/pos_embed_add.h"

#include "bindings.h"

namespace posenc_bind {

namespace {

PyObject* fwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "x", "x_dtype", "x_stride", "table", "table_dtype", "table_stride", "ptr", "idx", "w", "coords",
      "coords_image_stride", "desc", "out", "out_dtype", "B", "n", "C", "start", "angle_scale", "device",
      "stream"};
  Args p("pos_embed_add_fwd", names, args, nargs, kwnames);
  posenc::PosEmbedFwdArgs a{};
  a.x = p.ptr(0); const int x_dtype = p.i32(1); p.strides(2, a.x_stride, 3);
  a.table = p.ptr(3); const int table_dtype = p.i32(4); p.strides(5, a.table_stride, 2);
  a.ptr = static_cast<const int32_t*>(p.ptr(6)); a.idx = static_cast<const int32_t*>(p.ptr(7));
  a.w = static_cast<const float*>(p.ptr(8));
  a.coords = static_cast<const float*>(p.ptr(9)); a.coords_image_stride = p.i64(10);
  a.desc = static_cast<const float*>(p.ptr(11));
  a.out = p.ptr(12); const int out_dtype = p.i32(13);
  a.B = p.i64(14); a.n = p.i64(15); a.C = p.i64(16); a.start = p.i64(17); a.angle_scale = p.f32(18);
  const int device = p.i32(19);
  cudaStream_t stream = as_stream(p.ptr(20));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.x_dtype = as_dtype(x_dtype); a.table_dtype = as_dtype(table_dtype); a.out_dtype = as_dtype(out_dtype);
    posenc::pos_embed_add_fwd(a, device, stream);
  }, /*release_gil=*/true);
}

PyObject* grid_fwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "x", "x_dtype", "x_stride", "grid", "grid_dtype", "grid_stride", "Gh", "Gw", "chunks", "Q", "out",
      "out_dtype", "B", "n", "C", "device", "stream"};
  Args p("pos_embed_add_grid_fwd", names, args, nargs, kwnames);
  posenc::PosEmbedGridFwdArgs a{};
  a.x = p.ptr(0); const int x_dtype = p.i32(1); p.strides(2, a.x_stride, 3);
  a.grid = p.ptr(3); const int grid_dtype = p.i32(4); p.strides(5, a.grid_stride, 3);
  a.Gh = p.i64(6); a.Gw = p.i64(7);
  a.chunks = static_cast<const int32_t*>(p.ptr(8)); a.Q = p.i64(9);
  a.out = p.ptr(10); const int out_dtype = p.i32(11);
  a.B = p.i64(12); a.n = p.i64(13); a.C = p.i64(14);
  const int device = p.i32(15);
  cudaStream_t stream = as_stream(p.ptr(16));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.x_dtype = as_dtype(x_dtype); a.grid_dtype = as_dtype(grid_dtype); a.out_dtype = as_dtype(out_dtype);
    posenc::pos_embed_add_grid_fwd(a, device, stream);
  }, /*release_gil=*/true);
}

PyObject* bwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "grad", "grad_dtype", "grad_stride", "gtok", "tptr", "ttok", "tw", "K", "dtable", "dtable_dtype", "B", "n",
      "C", "start", "device", "stream"};
  Args p("pos_embed_add_bwd", names, args, nargs, kwnames);
  posenc::PosEmbedBwdArgs a{};
  a.grad = p.ptr(0); const int grad_dtype = p.i32(1); p.strides(2, a.grad_stride, 3);
  a.gtok = static_cast<float*>(p.ptr(3));
  a.tptr = static_cast<const int32_t*>(p.ptr(4)); a.ttok = static_cast<const int32_t*>(p.ptr(5));
  a.tw = static_cast<const float*>(p.ptr(6)); a.K = p.i64(7);
  a.dtable = p.ptr(8); const int dtable_dtype = p.i32(9);
  a.B = p.i64(10); a.n = p.i64(11); a.C = p.i64(12); a.start = p.i64(13);
  const int device = p.i32(14);
  cudaStream_t stream = as_stream(p.ptr(15));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.grad_dtype = as_dtype(grad_dtype); a.dtable_dtype = as_dtype(dtable_dtype);
    posenc::pos_embed_add_bwd(a, device, stream);
  }, /*release_gil=*/true);
}

}  // namespace

PyMethodDef* pos_embed_add_methods() {
  static PyMethodDef methods[] = {
      {"pos_embed_add_fwd", method(fwd), kFastCall,
       "out = x + learned rows + generated sinusoid (see pos_embed_add.h)"},
      {"pos_embed_add_grid_fwd", method(grid_fwd), kFastCall,
       "out = x + FlexVAR's area-resized grid, read in its own layout (see pos_embed_add.h)"},
      {"pos_embed_add_bwd", method(bwd), kFastCall,
       "d table from the output gradient, deterministic (see pos_embed_add.h)"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace posenc_bind
