#include "bindings.h"

namespace posenc_bind {

// Filled in by the qkv_proj work (issue in progress).
void bind_qkv_proj(py::module_& m) { (void)m; }

}  // namespace posenc_bind
