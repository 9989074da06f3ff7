"""bench/sass_report.py's parsing of ptxas' report and of a SASS listing, on excerpts of
real nvcc 13.0 output (the tool itself needs nvcc and cuobjdump; docs/kernels.md)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "sass_report", Path(__file__).resolve().parents[1] / "bench" / "sass_report.py")
sass_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_report)

PTXAS = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    88 bytes stack frame, 168 bytes spill stores, 156 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 88 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90'
ptxas info    : Function properties for _Z3barPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""

SASS = """\
\t\tFunction : _Z3fooPf
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000fe40000000800 */
        /*0010*/                   STL [R1+0x14], R34 ;                   /* 0x0000143401007387 */
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*0030*/              @!P0 LDL R28, [R1+0x2c] ;                   /* 0x00002c0001108983 */
        /*0040*/                   SHFL.BFLY PT, R5, R6, 0x10, 0x1f ;     /* 0x0e2000000e057f89 */
        /*0050*/                   MUFU.EX2 R53, R22 ;                    /* 0x0000001600357308 */
        /*0060*/                   EXIT ;                                 /* 0x000000000000794d */
\t\tFunction : _Z3barPf
        /*0000*/                   FFMA R4, R4, R40, RZ ;                 /* 0x0000002804047223 */
"""


def test_ptxas_report_per_kernel():
    got = sass_report.parse_ptxas(PTXAS)
    assert got == {
        "_Z3fooPf": dict(stack=88, spill_stores=168, spill_loads=156, registers=128),
        "_Z3barPf": dict(stack=0, spill_stores=0, spill_loads=0, registers=40),
    }


def test_sass_cut_at_barriers_and_counted():
    got = sass_report.parse_sass(SASS)
    assert set(got) == {"_Z3fooPf", "_Z3barPf"}
    first, second = got["_Z3fooPf"]  # the barrier ends the first region
    assert (first["instructions"], first["STL"], first["LDL"]) == (3, 1, 0)
    assert (second["instructions"], second["LDL"], second["SHFL"], second["MUFU"]) == (4, 1, 1, 1)
    assert [r["instructions"] for r in got["_Z3barPf"]] == [1]
