// Planned launches: the sampling fast path of the ops whose whole cost is host time.
//
// A plan is made once per call signature by the op layer, after its Python checks:
// the forward's arguments, parsed and converted, plus the signature (type, device,
// dtype, shape, strides) of each tensor argument. A launch (`launch_planned`) then
// takes only the tensors: it reads them through DLPack in C, launches if every
// signature matches the plan, and returns False, launching nothing, if any differs,
// so that the op layer checks the call afresh. Nothing here depends on a framework:
// the tensors are read through the DLPack C exchange API the framework hands over
// (`set_tensor_exchange`), or through its to-DLPack callable where it has none.
#pragma once

#include <cstring>
#include <memory>

#include "bindings.h"

namespace posenc_bind {

// DLPack's C ABI (the DLTensor layout of DLPack 0.6 to 1.x, and the exchange API of
// DLPack 1.2+), declared here so that the binding needs no framework header.
namespace dlpack {
struct Device { int32_t type, id; };
struct DataType { uint8_t code, bits; uint16_t lanes; };
struct Tensor {
  void* data; Device device; int32_t ndim; DataType dtype; int64_t* shape; int64_t* strides; uint64_t byte_offset;
};
struct ManagedTensor { Tensor dl_tensor; void* manager_ctx; void (*deleter)(ManagedTensor*); };
struct ExchangeApi {
  uint32_t major, minor;
  void* prev_api;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);  // may be null
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};
constexpr int32_t kCPU = 1, kCUDA = 2;
}  // namespace dlpack

constexpr int kPlanMaxDims = 4;
constexpr int kPlanMaxTensors = 4;

// What the checks read of a tensor argument (all zero for None), compared bytewise.
struct TensorSig {
  int32_t present, device_type, device_id, ndim;
  uint8_t code, bits;
  uint16_t lanes;
  int32_t unused;
  int64_t shape[kPlanMaxDims], strides[kPlanMaxDims];
};

// How tensors are read: the framework's exchange API when it has one (a C call that
// fills a non-owning DLTensor), else its to-DLPack callable (a capsule per tensor);
// only objects of the tensor types given are read.
struct TensorExchange {
  const dlpack::ExchangeApi* api = nullptr;
  PyObject* to_dlpack = nullptr;
  PyObject* raw_stream = nullptr;  // stream of a CUDA device index, without the exchange API
  PyObject* types[2] = {nullptr, nullptr};
  bool dry_run = false;  // the host path in full, no launch (host-overhead measurement)
};

inline TensorExchange& tensor_exchange() {
  static TensorExchange e;
  return e;
}

// Fills `sig` and `data` from `d`; false if it has more dimensions than a plan holds.
inline bool fill_sig(const dlpack::Tensor& d, TensorSig& sig, void*& data) {
  if (d.ndim > kPlanMaxDims) return false;
  sig.present = 1;
  sig.device_type = d.device.type;
  sig.device_id = d.device.id;
  sig.ndim = d.ndim;
  sig.code = d.dtype.code;
  sig.bits = d.dtype.bits;
  sig.lanes = d.dtype.lanes;
  int64_t compact = 1;
  for (int i = d.ndim - 1; i >= 0; --i) {
    sig.shape[i] = d.shape[i];
    sig.strides[i] = d.strides ? d.strides[i] : compact;  // null strides: compact row-major
    compact *= d.shape[i];
  }
  data = static_cast<char*>(d.data) + d.byte_offset;
  return true;
}

// Reads `obj` (None or a tensor): 1 read, 0 not a tensor this path takes (a subclass,
// too many dimensions), -1 error set.
inline int read_tensor(PyObject* obj, TensorSig& sig, void*& data) {
  std::memset(&sig, 0, sizeof sig);
  data = nullptr;
  if (obj == Py_None) return 1;
  const TensorExchange& e = tensor_exchange();
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj));
  if (!e.types[0] || (type != e.types[0] && type != e.types[1])) return 0;
  if (e.api) {
    dlpack::Tensor d;
    if (e.api->dltensor_from_py_object_no_sync(obj, &d) != 0) return -1;
    return fill_sig(d, sig, data) ? 1 : 0;
  }
  PyObject* capsule = PyObject_CallFunctionObjArgs(e.to_dlpack, obj, nullptr);
  if (!capsule) return -1;
  auto* m = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  const int ok = m ? (fill_sig(m->dl_tensor, sig, data) ? 1 : 0) : -1;
  Py_DECREF(capsule);  // unconsumed: its destructor releases the export (the tensor stays alive)
  return ok;
}

// A launch whose arguments are fixed but for the tensors' pointers and the stream.
class LaunchPlan {
 public:
  virtual ~LaunchPlan() = default;
  // ptrs: the data pointers of the plan's tensors (null for None), in order.
  virtual void launch(void* const* ptrs, void* out, cudaStream_t stream) const = 0;

  int num_tensors = 0;
  int device = 0;
  TensorSig sig[kPlanMaxTensors];
};

constexpr const char* kPlanCapsule = "posenc_fast.launch_plan";

// The capsule of `plan` after reading the signatures of `tensors` (slots of `p`) and
// running `finish` (which converts what is left and may throw like a core call).
template <class Plan, int N, class Finish>
PyObject* make_plan(std::unique_ptr<Plan> plan, Args& p, const int (&tensors)[N], Finish&& finish) {
  static_assert(N <= kPlanMaxTensors, "raise kPlanMaxTensors");
  if (p.failed()) return nullptr;
  plan->num_tensors = N;
  for (int i = 0; i < N; ++i) {
    void* data;
    const int r = read_tensor(p.object(tensors[i]), plan->sig[i], data);
    if (r < 0) return nullptr;
    if (r == 0) {
      PyErr_Format(PyExc_TypeError, "posenc_fast: a launch plan takes None or a tensor of at most %d dimensions "
                   "(exactly the tensor types given to set_tensor_exchange) for argument %d", kPlanMaxDims,
                   tensors[i] + 1);
      return nullptr;
    }
  }
  PyObject* ok = call_core([&] { finish(*plan); }, /*release_gil=*/false);
  if (!ok) return nullptr;
  Py_DECREF(ok);
  PyObject* capsule = PyCapsule_New(static_cast<LaunchPlan*>(plan.get()), kPlanCapsule, [](PyObject* c) {
    delete static_cast<LaunchPlan*>(PyCapsule_GetPointer(c, kPlanCapsule));
  });
  if (capsule) plan.release();
  return capsule;
}

// launch_planned(plan, out, *tensors) -> bool
inline PyObject* launch_planned(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  auto* plan = nargs >= 2 ? static_cast<const LaunchPlan*>(PyCapsule_GetPointer(args[0], kPlanCapsule)) : nullptr;
  if (!plan) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "launch_planned(plan, out, *tensors): too few arguments");
    return nullptr;
  }
  if (nargs != 2 + plan->num_tensors) {
    PyErr_Format(PyExc_TypeError, "launch_planned(): this plan takes %d tensors, got %zd", plan->num_tensors,
                 nargs - 2);
    return nullptr;
  }
  void* ptrs[kPlanMaxTensors];
  for (int i = 0; i < plan->num_tensors; ++i) {
    TensorSig sig;
    const int r = read_tensor(args[2 + i], sig, ptrs[i]);
    if (r <= 0 || std::memcmp(&sig, &plan->sig[i], sizeof sig) != 0) {
      PyErr_Clear();  // a tensor DLPack cannot describe: the op layer's own path says what is wrong
      Py_RETURN_FALSE;
    }
  }
  TensorSig out_sig;
  void* out;
  if (read_tensor(args[1], out_sig, out) <= 0 || !out) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  TensorExchange& e = tensor_exchange();
  if (e.dry_run) Py_RETURN_TRUE;
  const TensorSig& first = plan->sig[0];
  void* stream = nullptr;
  if (first.device_type == dlpack::kCUDA) {
    if (e.api) {
      if (e.api->current_work_stream(first.device_type, first.device_id, &stream) != 0) return nullptr;
    } else if (e.raw_stream) {
      PyObject* s = PyObject_CallFunction(e.raw_stream, "i", static_cast<int>(first.device_id));
      if (!s) return nullptr;
      stream = PyLong_AsVoidPtr(s);
      Py_DECREF(s);
      if (PyErr_Occurred()) return nullptr;
    }
  }
  PyObject* done = call_core([&] { plan->launch(ptrs, out, as_stream(stream)); }, /*release_gil=*/true);
  if (!done) return nullptr;
  Py_DECREF(done);
  Py_RETURN_TRUE;
}

// set_tensor_exchange(api_capsule or None, to_dlpack, raw_stream or None, tensor_type, parameter_type)
inline PyObject* set_tensor_exchange(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError,
                    "set_tensor_exchange(api, to_dlpack, raw_stream, tensor_type, parameter_type) takes 5 arguments");
    return nullptr;
  }
  const dlpack::ExchangeApi* api = nullptr;
  if (args[0] != Py_None) {
    api = static_cast<const dlpack::ExchangeApi*>(PyCapsule_GetPointer(args[0], "dlpack_exchange_api"));
    if (!api) return nullptr;
    // Major 1 keeps this layout; without the non-owning export, the callable serves.
    if (api->major != 1 || !api->dltensor_from_py_object_no_sync || !api->current_work_stream) api = nullptr;
  }
  if (!PyCallable_Check(args[1]) || (args[2] != Py_None && !PyCallable_Check(args[2])) || !PyType_Check(args[3]) ||
      !PyType_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "set_tensor_exchange(): to_dlpack and raw_stream must be callables (raw_stream "
                                     "may be None), tensor_type and parameter_type types");
    return nullptr;
  }
  TensorExchange& e = tensor_exchange();
  PyObject* keep[4] = {args[1], args[2] == Py_None ? nullptr : args[2], args[3], args[4]};
  for (PyObject* o : keep) Py_XINCREF(o);
  Py_XDECREF(e.to_dlpack);
  Py_XDECREF(e.raw_stream);
  Py_XDECREF(e.types[0]);
  Py_XDECREF(e.types[1]);
  e.api = api;
  e.to_dlpack = keep[0];
  e.raw_stream = keep[1];
  e.types[0] = keep[2];
  e.types[1] = keep[3];
  return PyBool_FromLong(api != nullptr);
}

inline PyObject* set_dry_run(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  tensor_exchange().dry_run = on;
  Py_RETURN_NONE;
}

inline PyMethodDef* launch_plan_methods() {
  static PyMethodDef methods[] = {
      {"launch_planned", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(launch_planned)), METH_FASTCALL,
       "launch_planned(plan, out, *tensors) -> bool: launches a plan if the tensors match its signatures "
       "(False: nothing launched)"},
      {"set_tensor_exchange", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(set_tensor_exchange)),
       METH_FASTCALL,
       "set_tensor_exchange(api, to_dlpack, raw_stream, tensor_type, parameter_type) -> bool: how launch plans "
       "read tensors (True: through the DLPack exchange API)"},
      {"set_dry_run", set_dry_run, METH_O,
       "set_dry_run(bool): planned launches do everything but launch (host-overhead measurement)"},
      {nullptr, nullptr, 0, nullptr}};
  return methods;
}

}  // namespace posenc_bind
