// nsa_torch._C's functions behind nsa_torch._debug: set the kernel overrides, read the plan log.
// Plain module functions (PyMethodDef), not torch ops: they touch process state, not tensors, and
// must stay out of torch.ops.nsa, of tracing and of torch.compile.
#include "debug_module.h"

#ifndef NSA_NO_PYTHON_MODULE
#include <stdexcept>
#include <string>

#include "kernel_plan.h"

namespace nsa_torch {
namespace {

// The overrides of a dict {key: str or int}; throws std::invalid_argument for a bad key or value.
nsa::PlanOverrides overrides_of(PyObject* choices) {
  if (!PyDict_Check(choices)) throw std::invalid_argument("nsa_torch._debug.force: expected a dict");
  nsa::PlanOverrides o;
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(choices, &pos, &key, &value)) {
    const char* k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : nullptr;
    if (k == nullptr) throw std::invalid_argument("nsa_torch._debug.force: keys must be strings");
    if (PyUnicode_Check(value)) {
      nsa::set_override(o, k, std::string(PyUnicode_AsUTF8(value)));
    } else if (PyLong_Check(value) && !PyBool_Check(value)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
      if (overflow) throw std::invalid_argument(std::string("nsa_torch._debug.force: ") + k + " is out of range");
      nsa::set_override(o, k, int64_t(v));
    } else {
      PyObject* r = PyObject_Repr(value);
      const std::string shown = r && PyUnicode_Check(r) ? PyUnicode_AsUTF8(r) : "?";
      Py_XDECREF(r);
      nsa::plan_values(k);  // an unknown key is named first
      throw std::invalid_argument(std::string("nsa_torch._debug.force: ") + k + "=" + shown +
                                  ": expected a kernel name (str) or an int");
    }
  }
  return o;
}

// _debug_force(choices, apply): validates the dict of overrides; with apply true, puts it in force
// (replacing the previous overrides). ValueError for an unknown key or a bad value.
PyObject* debug_force(PyObject*, PyObject* args) {
  PyObject* choices;
  int apply;
  if (!PyArg_ParseTuple(args, "Op", &choices, &apply)) return nullptr;
  try {
    const nsa::PlanOverrides o = overrides_of(choices);
    if (apply) set_plan_overrides(o);
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// _debug_keys(): {key: tuple of kernel names, empty for the int keys}.
PyObject* debug_keys(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  for (const std::string& key : nsa::plan_keys()) {
    const auto& names = nsa::plan_values(key);
    PyObject* t = PyTuple_New(Py_ssize_t(names.size()));
    if (!t) return Py_DECREF(d), nullptr;
    for (size_t i = 0; i < names.size(); ++i) PyTuple_SET_ITEM(t, Py_ssize_t(i), PyUnicode_FromString(names[i].c_str()));
    const int err = PyDict_SetItemString(d, key.c_str(), t);
    Py_DECREF(t);
    if (err) return Py_DECREF(d), nullptr;
  }
  return d;
}

// _debug_decode_trace(address, blocks): decode_attention's trace buffer (a CUDA int64 tensor's
// data_ptr, holding kTraceKernels * blocks * kTraceEvents values), or (0, 0) for none. The caller keeps the
// buffer alive while it is set.
PyObject* debug_decode_trace(PyObject*, PyObject* args) {
  unsigned long long address;
  int blocks;
  if (!PyArg_ParseTuple(args, "Ki", &address, &blocks)) return nullptr;
  if (blocks < 0 || (blocks > 0) != (address != 0)) {
    PyErr_SetString(PyExc_ValueError, "nsa_torch._debug.decode_trace: expected a buffer and blocks > 0, or neither");
    return nullptr;
  }
  set_decode_trace(reinterpret_cast<uint64_t*>(uintptr_t(address)), blocks);
  Py_RETURN_NONE;
}

PyObject* debug_plans_open(PyObject*, PyObject*) { return PyLong_FromSize_t(plan_log_open()); }

PyObject* debug_plans_close(PyObject*, PyObject*) {
  plan_log_close();
  Py_RETURN_NONE;
}

// _debug_plans_read(start): the logged plans from index start on, as dicts {"op": ..., key: ...}.
PyObject* debug_plans_read(PyObject*, PyObject* args) {
  Py_ssize_t from;
  if (!PyArg_ParseTuple(args, "n", &from)) return nullptr;
  const std::vector<PlanRecord> records = plan_log_read(size_t(from < 0 ? 0 : from));
  PyObject* list = PyList_New(0);
  if (!list) return nullptr;
  for (const PlanRecord& r : records) {
    PyObject* d = PyDict_New();
    bool ok = d != nullptr;
    auto put = [&](const char* key, PyObject* v) {  // steals v
      ok = ok && v != nullptr && PyDict_SetItemString(d, key, v) == 0;
      Py_XDECREF(v);
    };
    put("op", PyUnicode_FromString(r.op.c_str()));
    for (const nsa::PlanItem& it : r.items)
      put(it.key.c_str(), it.name.empty() ? PyLong_FromLongLong(it.number) : PyUnicode_FromString(it.name.c_str()));
    ok = ok && PyList_Append(list, d) == 0;
    Py_XDECREF(d);
    if (!ok) return Py_DECREF(list), nullptr;
  }
  return list;
}

}  // namespace

PyMethodDef kDebugMethods[] = {
    {"_debug_force", debug_force, METH_VARARGS, "Validates (and with apply, sets) the kernel overrides."},
    {"_debug_keys", debug_keys, METH_NOARGS, "The override keys and their kernel names."},
    {"_debug_decode_trace", debug_decode_trace, METH_VARARGS, "Sets (or clears) decode_attention's trace buffer."},
    {"_debug_plans_open", debug_plans_open, METH_NOARGS, "Opens a recording of kernel plans."},
    {"_debug_plans_read", debug_plans_read, METH_VARARGS, "The recorded plans from an index on."},
    {"_debug_plans_close", debug_plans_close, METH_NOARGS, "Closes a recording of kernel plans."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace nsa_torch
#endif
