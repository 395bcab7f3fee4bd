#include "posenc_fast/pos_embed_add.h"

#include "launch_plan.h"

namespace posenc_bind {

namespace {

// The forwards' arguments; with `planned`, x and the table (or grid) are the tensors
// themselves (their pointers come with each launch) and out and stream are ignored.
template <class A>
struct FwdCall {
  A a{};
  int codes[3] = {};  // x, table or grid, out: converted in the core call (as_dtype throws)
  int device = 0;
  cudaStream_t stream = nullptr;
};

constexpr int kFwdTensors[] = {0, 3};  // x, table or grid

const char* const kFwdNames[] = {
    "x", "x_dtype", "x_stride", "table", "table_dtype", "table_stride", "ptr", "idx", "w", "coords",
    "coords_image_stride", "desc", "out", "out_dtype", "B", "n", "C", "start", "angle_scale", "device",
    "stream"};

void parse_fwd(Args& p, FwdCall<posenc::PosEmbedFwdArgs>& c, bool planned) {
  posenc::PosEmbedFwdArgs& a = c.a;
  if (!planned) a.x = p.ptr(0), a.table = p.ptr(3), a.out = p.ptr(12), c.stream = as_stream(p.ptr(20));
  c.codes[0] = p.i32(1); p.strides(2, a.x_stride, 3);
  c.codes[1] = p.i32(4); p.strides(5, a.table_stride, 2);
  a.ptr = static_cast<const int32_t*>(p.ptr(6)); a.idx = static_cast<const int32_t*>(p.ptr(7));
  a.w = static_cast<const float*>(p.ptr(8));
  a.coords = static_cast<const float*>(p.ptr(9)); a.coords_image_stride = p.i64(10);
  a.desc = static_cast<const float*>(p.ptr(11));
  c.codes[2] = p.i32(13);
  a.B = p.i64(14); a.n = p.i64(15); a.C = p.i64(16); a.start = p.i64(17); a.angle_scale = p.f32(18);
  c.device = p.i32(19);
}

void resolve(FwdCall<posenc::PosEmbedFwdArgs>& c) {
  c.a.x_dtype = as_dtype(c.codes[0]); c.a.table_dtype = as_dtype(c.codes[1]); c.a.out_dtype = as_dtype(c.codes[2]);
}

const char* const kGridNames[] = {
    "x", "x_dtype", "x_stride", "grid", "grid_dtype", "grid_stride", "Gh", "Gw", "chunks", "Q", "out",
    "out_dtype", "B", "n", "C", "device", "stream"};

void parse_fwd(Args& p, FwdCall<posenc::PosEmbedGridFwdArgs>& c, bool planned) {
  posenc::PosEmbedGridFwdArgs& a = c.a;
  if (!planned) a.x = p.ptr(0), a.grid = p.ptr(3), a.out = p.ptr(10), c.stream = as_stream(p.ptr(16));
  c.codes[0] = p.i32(1); p.strides(2, a.x_stride, 3);
  c.codes[1] = p.i32(4); p.strides(5, a.grid_stride, 3);
  a.Gh = p.i64(6); a.Gw = p.i64(7);
  a.chunks = static_cast<const int32_t*>(p.ptr(8)); a.Q = p.i64(9);
  c.codes[2] = p.i32(11);
  a.B = p.i64(12); a.n = p.i64(13); a.C = p.i64(14);
  c.device = p.i32(15);
}

void resolve(FwdCall<posenc::PosEmbedGridFwdArgs>& c) {
  c.a.x_dtype = as_dtype(c.codes[0]); c.a.grid_dtype = as_dtype(c.codes[1]); c.a.out_dtype = as_dtype(c.codes[2]);
}

void core(const posenc::PosEmbedFwdArgs& a, int device, cudaStream_t s) { posenc::pos_embed_add_fwd(a, device, s); }
void core(const posenc::PosEmbedGridFwdArgs& a, int device, cudaStream_t s) {
  posenc::pos_embed_add_grid_fwd(a, device, s);
}
void set_pointers(posenc::PosEmbedFwdArgs& a, void* const* p, void* out) { a.x = p[0], a.table = p[1], a.out = out; }
void set_pointers(posenc::PosEmbedGridFwdArgs& a, void* const* p, void* out) {
  a.x = p[0], a.grid = p[1], a.out = out;
}

template <class A, int N>
PyObject* fwd(const char* fn, const char* const (&names)[N], PyObject* const* args, Py_ssize_t nargs,
              PyObject* kwnames) {
  Args p(fn, names, args, nargs, kwnames);
  FwdCall<A> c;
  parse_fwd(p, c, /*planned=*/false);
  if (p.failed()) return nullptr;
  return call_core([&] {
    resolve(c);
    core(c.a, c.device, c.stream);
  }, /*release_gil=*/true);
}

template <class A>
struct FwdPlan final : LaunchPlan {
  A a;
  void launch(void* const* ptrs, void* out, cudaStream_t stream) const override {
    A b = a;
    set_pointers(b, ptrs, out);
    core(b, device, stream);
  }
};

template <class A, int N>
PyObject* fwd_plan(const char* fn, const char* const (&names)[N], PyObject* const* args, Py_ssize_t nargs,
                   PyObject* kwnames) {
  Args p(fn, names, args, nargs, kwnames);
  FwdCall<A> c;
  parse_fwd(p, c, /*planned=*/true);
  return make_plan(std::make_unique<FwdPlan<A>>(), p, kFwdTensors, [&](FwdPlan<A>& plan) {
    resolve(c);
    plan.a = c.a;
    plan.device = c.device;
  });
}

PyObject* table_fwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return fwd<posenc::PosEmbedFwdArgs>("pos_embed_add_fwd", kFwdNames, args, nargs, kwnames);
}
PyObject* table_fwd_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return fwd_plan<posenc::PosEmbedFwdArgs>("pos_embed_add_fwd_plan", kFwdNames, args, nargs, kwnames);
}
PyObject* grid_fwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return fwd<posenc::PosEmbedGridFwdArgs>("pos_embed_add_grid_fwd", kGridNames, args, nargs, kwnames);
}
PyObject* grid_fwd_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return fwd_plan<posenc::PosEmbedGridFwdArgs>("pos_embed_add_grid_fwd_plan", kGridNames, args, nargs, kwnames);
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
      {"pos_embed_add_fwd", method(table_fwd), kFastCall,
       "out = x + learned rows + generated sinusoid (see pos_embed_add.h)"},
      {"pos_embed_add_fwd_plan", method(table_fwd_plan), kFastCall,
       "pos_embed_add_fwd's arguments, with the tensors x and table in place of their pointers -> a plan for "
       "launch_planned(plan, out, x, table)"},
      {"pos_embed_add_grid_fwd", method(grid_fwd), kFastCall,
       "out = x + FlexVAR's area-resized grid, read in its own layout (see pos_embed_add.h)"},
      {"pos_embed_add_grid_fwd_plan", method(grid_fwd_plan), kFastCall,
       "pos_embed_add_grid_fwd's arguments, with the tensors x and grid in place of their pointers -> a plan "
       "for launch_planned(plan, out, x, grid)"},
      {"pos_embed_add_bwd", method(bwd), kFastCall,
       "d table from the output gradient, deterministic (see pos_embed_add.h)"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace posenc_bind
