// Python module of one emulated op family: the family's real binding code
// (csrc/bindings/<family>.cpp, so the API is that of posenc_fast._C) plus emulator
// controls. The build defines POSENC_EMU_MODULE (module name) and POSENC_EMU_BIND
// (the family's posenc_bind::bind_<family>).
#include <sanitizer/common_interface_defs.h>

#include "bindings.h"

PYBIND11_MODULE(POSENC_EMU_MODULE, m) {
  posenc_bind::POSENC_EMU_BIND(m);
  m.def("emu_set_num_sms", [](int n) { emu_num_sms = n; }, "SM count cudaDeviceGetAttribute reports");
  m.def("emu_set_report_path", [](const std::string& path) { __sanitizer_set_report_path(path.c_str()); },
        "sanitizer reports go to files path.<pid> (the runtime ignores UBSAN_OPTIONS set after start-up)");
  m.def("emu_take_kernels", []() {
    std::lock_guard<std::mutex> g(emu_kernels_mu);
    std::vector<std::string> names(emu_kernels.begin(), emu_kernels.end());
    emu_kernels.clear();
    return names;
  }, "names of the kernels (with template arguments) that ran since the last call");
}
