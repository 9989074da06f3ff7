"""Builds the coupled_mamba_ext._C extension: C++ CPU kernels always, CUDA kernels when torch
has CUDA and nvcc is found (or FORCE_CUDA=1; FORCE_CUDA=0 builds CPU-only).

Honours TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible) and MAX_JOBS.
Sources are found by convention: csrc/*.cpp, csrc/cpu/*.cpp, csrc/cuda/*.{cpp,cu}.
"""
import glob
import os
import re

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def base_version() -> str:
    text = open(os.path.join(ROOT, "coupled_mamba_ext", "__init__.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_archs() -> str:
    """The arch list torch's build will use; set it when no GPU is visible, since torch's
    detection fails then."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                     for i in range(torch.cuda.device_count())}))
        else:
            archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def sources(*patterns):
    return sorted(f for p in patterns for f in glob.glob(os.path.join("csrc", p)))


def extension():
    with_cuda = want_cuda()
    defines = ['-DCOUPLED_MAMBA_TORCH_VERSION="%s"' % torch.__version__]
    # torch adds the C++ standard it needs. -fopenmp: at::parallel_for is inline OpenMP code
    # in torch's headers, serial without it. -fno-trapping-math lets gcc turn the clamps of
    # the CPU kernels' exp into min/max instructions and vectorise the loop over states.
    # -g0 undoes the -g of Python's own compiler flags: debug information for torch's headers
    # made each file a quarter slower to compile (68 -> 51 s for csrc/coupled_scan.cpp when it
    # still included torch/extension.h).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-g0"]
    link = ["-fopenmp"]
    includes = [os.path.join(ROOT, "include")]
    if not with_cuda:
        return CppExtension(
            "coupled_mamba_ext._C", sources("*.cpp", "cpu/*.cpp"), include_dirs=includes,
            extra_compile_args={"cxx": cxx + defines}, extra_link_args=link), None
    archs = cuda_archs()
    defines += ["-DCOUPLED_MAMBA_WITH_CUDA", '-DCOUPLED_MAMBA_CUDA_ARCHS="%s"' % archs]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    ext = CUDAExtension(
        "coupled_mamba_ext._C",
        sources("*.cpp", "cpu/*.cpp", "cuda/*.cpp", "cuda/*.cu"),
        include_dirs=includes,
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=link)
    return ext, archs


def local_version(with_cuda: bool) -> str:
    """e.g. +cu130torch2.14 — the wheel says which CUDA and torch it needs."""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    tag = "cu" + torch.version.cuda.replace(".", "") if with_cuda else "cpu"
    return "+%storch%s" % (tag, torch_mm)


ext, archs = extension()
if archs:
    print("coupled_mamba_ext: building CUDA kernels for archs", archs)
else:
    print("coupled_mamba_ext: building CPU kernels only")

setup(
    version=base_version() + local_version(archs is not None),
    license="Apache-2.0",
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
