#include "posenc_fast/pyramid_pos_level_add.h"

#include "bindings.h"

namespace posenc_bind {

using posenc::DType;

void bind_pyramid_pos_level_add(py::module_& m) {
  m.def(
      "pyramid_pos_level_add_fwd",
      [](std::uintptr_t x, int x_dtype, std::vector<int64_t> x_stride, std::uintptr_t pos, int pos_dtype,
         std::vector<int64_t> pos_stride, std::uintptr_t lvl, int lvl_dtype, std::vector<int64_t> lvl_stride,
         std::uintptr_t token_meta, std::uintptr_t out, int out_dtype, int64_t B, int64_t n, int64_t C,
         int64_t start, float pos_weight, float sincos_weight, int device, std::uintptr_t stream) {
        POSENC_CHECK_ARG(x_stride.size() == 3 && pos_stride.size() == 2 && lvl_stride.size() == 2,
                         "pyramid_pos_level_add_fwd: x_stride needs 3 entries, pos_stride and lvl_stride 2");
        posenc::PyramidAddFwdArgs a{};
        a.x = cptr(x); a.x_dtype = as_dtype(x_dtype);
        std::copy(x_stride.begin(), x_stride.end(), a.x_stride);
        a.pos = cptr(pos); a.pos_dtype = as_dtype(pos_dtype);
        std::copy(pos_stride.begin(), pos_stride.end(), a.pos_stride);
        a.lvl = cptr(lvl); a.lvl_dtype = as_dtype(lvl_dtype);
        std::copy(lvl_stride.begin(), lvl_stride.end(), a.lvl_stride);
        a.token_meta = static_cast<const int32_t*>(cptr(token_meta));
        a.out = mptr(out); a.out_dtype = as_dtype(out_dtype);
        a.B = B; a.n = n; a.C = C; a.start = start;
        a.pos_weight = pos_weight; a.sincos_weight = sincos_weight;
        py::gil_scoped_release nogil;
        posenc::pyramid_pos_level_add_fwd(a, device, as_stream(stream));
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("x_stride"), py::arg("pos"), py::arg("pos_dtype"),
      py::arg("pos_stride"), py::arg("lvl"), py::arg("lvl_dtype"), py::arg("lvl_stride"), py::arg("token_meta"),
      py::arg("out"), py::arg("out_dtype"), py::arg("B"), py::arg("n"), py::arg("C"), py::arg("start"),
      py::arg("pos_weight"), py::arg("sincos_weight"), py::arg("device"), py::arg("stream"),
      "out = x + lvl[level] + pos_weight * pos + sincos_weight * sincos (see pyramid_pos_level_add.h)");

  m.def(
      "pyramid_pos_level_add_bwd",
      [](std::uintptr_t grad, int grad_dtype, std::vector<int64_t> grad_stride, std::uintptr_t dpos, int dpos_dtype,
         int64_t dpos_row_stride, std::uintptr_t dlvl, int dlvl_dtype, int64_t dlvl_row_stride,
         std::uintptr_t chunks, int64_t num_chunks, std::uintptr_t level_chunk_offsets, int64_t S,
         std::uintptr_t partial, int64_t B, int64_t n, int64_t C, float pos_weight, int device,
         std::uintptr_t stream) {
        POSENC_CHECK_ARG(grad_stride.size() == 3, "pyramid_pos_level_add_bwd: grad_stride needs 3 entries");
        posenc::PyramidAddBwdArgs a{};
        a.grad = cptr(grad); a.grad_dtype = as_dtype(grad_dtype);
        std::copy(grad_stride.begin(), grad_stride.end(), a.grad_stride);
        a.dpos = mptr(dpos); a.dpos_dtype = as_dtype(dpos_dtype); a.dpos_row_stride = dpos_row_stride;
        a.dlvl = mptr(dlvl); a.dlvl_dtype = as_dtype(dlvl_dtype); a.dlvl_row_stride = dlvl_row_stride;
        a.chunks = static_cast<const int32_t*>(cptr(chunks)); a.num_chunks = num_chunks;
        a.level_chunk_offsets = static_cast<const int32_t*>(cptr(level_chunk_offsets)); a.S = S;
        a.partial = static_cast<float*>(mptr(partial));
        a.B = B; a.n = n; a.C = C; a.pos_weight = pos_weight;
        py::gil_scoped_release nogil;
        posenc::pyramid_pos_level_add_bwd(a, device, as_stream(stream));
      },
      py::arg("grad"), py::arg("grad_dtype"), py::arg("grad_stride"), py::arg("dpos"), py::arg("dpos_dtype"),
      py::arg("dpos_row_stride"), py::arg("dlvl"), py::arg("dlvl_dtype"), py::arg("dlvl_row_stride"),
      py::arg("chunks"), py::arg("num_chunks"), py::arg("level_chunk_offsets"), py::arg("S"), py::arg("partial"),
      py::arg("B"), py::arg("n"), py::arg("C"), py::arg("pos_weight"), py::arg("device"), py::arg("stream"),
      "dpos (window rows) and dlvl from the output gradient, deterministic (see pyramid_pos_level_add.h)");
}

}  // namespace posenc_bind
