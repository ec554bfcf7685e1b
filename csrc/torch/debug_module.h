// The functions of the nsa_torch._C module behind nsa_torch._debug (debug_module.cpp).
#pragma once

#ifndef NSA_NO_PYTHON_MODULE
#include <Python.h>

namespace nsa_torch {
// Null-terminated method table of nsa_torch._C.
extern PyMethodDef kDebugMethods[];
}  // namespace nsa_torch
#endif
