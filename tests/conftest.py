"""pytest hooks of the suite (the shared helpers are in helpers.py).

The C++ ops fill every output with NaN (float) or INT32_MIN (int) before their kernel runs when
NSA_POISON_OUTPUTS=1, so an element a kernel forgets to write fails every comparison. The flag is
read when the first output is allocated; it is set here, before anything imports nsa_torch.
"""
import os

os.environ["NSA_POISON_OUTPUTS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import nsa_torch  # noqa: E402


def pytest_report_header(config):
    if nsa_torch._C is None:
        return f"nsa_torch._C: NOT LOADED ({nsa_torch._C_ERROR}); every op test will fail"
    return f"nsa_torch._C: {nsa_torch._C.__file__}"


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
