"""Build of nsa_torch._C: the nsa:: torch ops with their C++ CPU kernels and, when CUDA is
available to the build, their CUDA kernels.

    pip install --no-build-isolation -e .

Environment:
    NSA_BUILD_CUDA=0|1      force the CUDA part off/on (default: on when nvcc and a CUDA build
                            of torch are present; a visible GPU is not needed)
    TORCH_CUDA_ARCH_LIST    CUDA targets (default "9.0a"; add "8.0" for A100)
    MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch derives CUDA_HOME from the nvcc on PATH; a wrapper such as /usr/local/bin/nvcc then gives
# /usr/local, where no CUDA runtime library lies. Prefer the toolkit's own directory.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
        "/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("NSA_BUILD_CUDA")
    have = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag is None:
        return have
    if flag not in ("0", "1"):
        raise SystemExit(f"NSA_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "1" and not have:
        raise SystemExit("NSA_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing "
                         f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return flag == "1"


def _sources(*patterns):
    files = []
    for p in patterns:
        files += sorted(glob.glob(os.path.join(ROOT, p), recursive=True))
    return [os.path.relpath(f, ROOT) for f in files]


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # -fopenmp: at::parallel_for (the CPU kernels' thread pool) is an inline OpenMP template;
    # compiled without it, its `omp parallel` is ignored and every op runs on one thread.
    cxx = ["-O3", "-Wall", "-Wno-unused-parameter", "-fopenmp"]
    link = ["-fopenmp"]
    sources = _sources("csrc/nsa/*.cpp", "csrc/nsa/cpu/*.cpp", "csrc/torch/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return CppExtension("nsa_torch._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
    sources += _sources("csrc/nsa/cuda/**/*.cu", "csrc/torch/*.cu")
    return CUDAExtension("nsa_torch._C", sources, include_dirs=include_dirs,
                         define_macros=[("NSA_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx + ["-DNSA_WITH_CUDA=1"], "nvcc": nvcc},
                         extra_link_args=link)


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
