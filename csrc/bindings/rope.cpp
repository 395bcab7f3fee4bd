#include "bindings.h"

namespace posenc_bind {

// Filled in by the rope work (issue in progress).
void bind_rope(py::module_& m) { (void)m; }

}  // namespace posenc_bind
