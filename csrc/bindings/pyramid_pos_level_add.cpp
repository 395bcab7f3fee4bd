#include "posenc_fast/pyramid_pos_level_add.h"

#include "launch_plan.h"

namespace posenc_bind {

namespace {

// The forward's arguments; with `planned`, x, pos and lvl are the tensors themselves
// (their pointers come with each launch) and out and stream are ignored.
struct FwdCall {
  posenc::PyramidAddFwdArgs a{};
  int codes[4] = {};  // x, pos, lvl, out: converted in the core call (as_dtype throws)
  int device = 0;
  cudaStream_t stream = nullptr;

  void resolve() {
    a.x_dtype = as_dtype(codes[0]); a.pos_dtype = as_dtype(codes[1]);
    a.lvl_dtype = as_dtype(codes[2]); a.out_dtype = as_dtype(codes[3]);
  }
};

constexpr int kFwdTensors[] = {0, 3, 6};  // x, pos, lvl

void parse_fwd(Args& p, FwdCall& c, bool planned) {
  posenc::PyramidAddFwdArgs& a = c.a;
  if (!planned) a.x = p.ptr(0), a.pos = p.ptr(3), a.lvl = p.ptr(6), a.out = p.ptr(10), c.stream = as_stream(p.ptr(19));
  c.codes[0] = p.i32(1); p.strides(2, a.x_stride, 3);
  c.codes[1] = p.i32(4); p.strides(5, a.pos_stride, 2);
  c.codes[2] = p.i32(7); p.strides(8, a.lvl_stride, 2);
  a.token_meta = static_cast<const int32_t*>(p.ptr(9));
  c.codes[3] = p.i32(11);
  a.B = p.i64(12); a.n = p.i64(13); a.C = p.i64(14); a.start = p.i64(15);
  a.pos_weight = p.f32(16); a.sincos_weight = p.f32(17);
  c.device = p.i32(18);
}

const char* const kFwdNames[] = {
    "x", "x_dtype", "x_stride", "pos", "pos_dtype", "pos_stride", "lvl", "lvl_dtype", "lvl_stride",
    "token_meta", "out", "out_dtype", "B", "n", "C", "start", "pos_weight", "sincos_weight", "device",
    "stream"};

PyObject* fwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  Args p("pyramid_pos_level_add_fwd", kFwdNames, args, nargs, kwnames);
  FwdCall c;
  parse_fwd(p, c, /*planned=*/false);
  if (p.failed()) return nullptr;
  return call_core([&] {
    c.resolve();
    posenc::pyramid_pos_level_add_fwd(c.a, c.device, c.stream);
  }, /*release_gil=*/true);
}

struct FwdPlan final : LaunchPlan {
  posenc::PyramidAddFwdArgs a;
  void launch(void* const* ptrs, void* out, cudaStream_t stream) const override {
    posenc::PyramidAddFwdArgs b = a;
    b.x = ptrs[0], b.pos = ptrs[1], b.lvl = ptrs[2], b.out = out;
    posenc::pyramid_pos_level_add_fwd(b, device, stream);
  }
};

PyObject* fwd_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  Args p("pyramid_pos_level_add_fwd_plan", kFwdNames, args, nargs, kwnames);
  FwdCall c;
  parse_fwd(p, c, /*planned=*/true);
  return make_plan(std::make_unique<FwdPlan>(), p, kFwdTensors, [&](FwdPlan& plan) {
    c.resolve();
    plan.a = c.a;
    plan.device = c.device;
  });
}

PyObject* bwd(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {
      "grad", "grad_dtype", "grad_stride", "dpos", "dpos_dtype", "dpos_row_stride", "dlvl", "dlvl_dtype",
      "dlvl_row_stride", "chunks", "num_chunks", "level_chunk_offsets", "S", "partial", "B", "n", "C",
      "pos_weight", "device", "stream"};
  Args p("pyramid_pos_level_add_bwd", names, args, nargs, kwnames);
  posenc::PyramidAddBwdArgs a{};
  a.grad = p.ptr(0); const int grad_dtype = p.i32(1); p.strides(2, a.grad_stride, 3);
  a.dpos = p.ptr(3); const int dpos_dtype = p.i32(4); a.dpos_row_stride = p.i64(5);
  a.dlvl = p.ptr(6); const int dlvl_dtype = p.i32(7); a.dlvl_row_stride = p.i64(8);
  a.chunks = static_cast<const int32_t*>(p.ptr(9)); a.num_chunks = p.i64(10);
  a.level_chunk_offsets = static_cast<const int32_t*>(p.ptr(11)); a.S = p.i64(12);
  a.partial = static_cast<float*>(p.ptr(13));
  a.B = p.i64(14); a.n = p.i64(15); a.C = p.i64(16); a.pos_weight = p.f32(17);
  const int device = p.i32(18);
  cudaStream_t stream = as_stream(p.ptr(19));
  if (p.failed()) return nullptr;
  return call_core([&] {
    a.grad_dtype = as_dtype(grad_dtype); a.dpos_dtype = as_dtype(dpos_dtype); a.dlvl_dtype = as_dtype(dlvl_dtype);
    posenc::pyramid_pos_level_add_bwd(a, device, stream);
  }, /*release_gil=*/true);
}

}  // namespace

PyMethodDef* pyramid_pos_level_add_methods() {
  static PyMethodDef methods[] = {
      {"pyramid_pos_level_add_fwd", method(fwd), kFastCall,
       "out = x + lvl[level] + pos_weight * pos + sincos_weight * sincos (see pyramid_pos_level_add.h)"},
      {"pyramid_pos_level_add_fwd_plan", method(fwd_plan), kFastCall,
       "the forward's arguments, with the tensors x, pos, lvl in place of their pointers -> a plan for "
       "launch_planned(plan, out, x, pos, lvl)"},
      {"pyramid_pos_level_add_bwd", method(bwd), kFastCall,
       "dpos (window rows) and dlvl from the output gradient, deterministic (see pyramid_pos_level_add.h)"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace posenc_bind
