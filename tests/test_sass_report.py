"""bench/sass_report.py: the parsing of ptxas' report and of a SASS listing (excerpts of real
nvcc 13.0 output), and the static performance model's loops, branches, trip counts and
launch plans on a small fixed listing (the tool itself needs nvcc and cuobjdump;
docs/kernels.md)."""
import importlib.util
from pathlib import Path

import pytest

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


# A kernel with an outer loop (0x10-0x150) around an inner one (0x20-0x50, two back edges:
# a `continue` and the latch), an unrolled loop over 3 modalities with 2 exponentials each
# behind guards sharing one target (0x100), two rounds of a run-time lane sum (offsets 16
# and 1), and the idle branch after EXIT.
LOOPS_SASS = """\
\t\tFunction : _Z4scanPf
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   LDS R2, [R0] ;
        /*0030*/               @P0 BRA 0x20 ;
        /*0040*/                   FADD R2, R2, R2 ;
        /*0050*/               @P1 BRA 0x20 ;
        /*0060*/                   ISETP.GE.AND P2, PT, R3, 0x1, PT ;
        /*0070*/               @P2 BRA 0x100 ;
        /*0080*/                   MUFU.EX2 R4, R4 ;
        /*0090*/                   MUFU.EX2 R5, R5 ;
        /*00a0*/               @P3 BRA 0x100 ;
        /*00b0*/                   MUFU.EX2 R4, R4 ;
        /*00c0*/                   MUFU.EX2 R5, R5 ;
        /*00d0*/               @P4 BRA 0x100 ;
        /*00e0*/                   MUFU.EX2 R4, R4 ;
        /*00f0*/                   MUFU.EX2 R5, R5 ;
        /*0100*/              @!P5 BRA 0x120 ;
        /*0110*/                   SHFL.BFLY PT, R7, R6, 0x10, 0x1f ;
        /*0120*/              @!P6 BRA 0x140 ;
        /*0130*/                   SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;
        /*0140*/                   STL [R1], R7 ;
        /*0150*/               @P0 BRA 0x10 ;
        /*0160*/                   EXIT ;
        /*0170*/                   BRA 0x170;
        /*0180*/                   NOP;
"""


def test_loops_found_from_back_edges_and_nested():
    code = sass_report.parse_listing(LOOPS_SASS)["_Z4scanPf"]
    assert code[1].name == "BAR.SYNC.DEFER_BLOCKING" and code[3].branch_target() == 0x20
    (outer,) = sass_report.find_loops(code)  # the idle BRA 0x170 is no loop
    (inner,) = outer.children
    assert (code[outer.first].address, code[outer.last].address) == (0x10, 0x150)
    assert (code[inner.first].address, code[inner.last].address) == (0x20, 0x50)
    owner = sass_report.innermost_loops(code, [outer])
    assert [owner[i] for i in (0, 1, 2, 5, 6, 21, 22)] == [None, 0, 1, 1, 0, 0, None]


def test_overlapping_loops_refused():
    sass = LOOPS_SASS.replace("@P1 BRA 0x20", "@P1 BRA 0x10")
    sass = sass.replace("@P0 BRA 0x10", "@P0 BRA 0x20")
    code = sass_report.parse_listing(sass)["_Z4scanPf"]
    with pytest.raises(ValueError, match="overlap"):
        sass_report.find_loops(code)


def test_guards_and_shuffle_rounds_recognised():
    code = sass_report.parse_listing(LOOPS_SASS)["_Z4scanPf"]
    owner = sass_report.innermost_loops(code, sass_report.find_loops(code))
    branches = sass_report.forward_branches(code)
    at = {ins.address: i for i, ins in enumerate(code)}
    assert branches == [(at[0x70], at[0x100]), (at[0xa0], at[0x100]), (at[0xd0], at[0x100]),
                        (at[0x100], at[0x120]), (at[0x120], at[0x140])]
    guards = sass_report.modality_guards(code, branches, owner, {0}, states=2)
    assert guards == {at[0x70]: 0, at[0xa0]: 1, at[0xd0]: 2}
    # one modality's exponentials are one per state of the lane: with 4 states these are
    # not modality groups (an unrolled loop over steps looks like this)
    assert sass_report.modality_guards(code, branches, owner, {0}, states=4) == {}
    assert sass_report.modality_guards(code, branches, owner, {1}, states=2) == {}
    assert sass_report.shuffle_round_offset(code, at[0x100], at[0x120]) == 16
    assert sass_report.shuffle_round_offset(code, at[0x120], at[0x140]) == 1
    assert sass_report.shuffle_round_offset(code, at[0x70], at[0x100]) is None


def test_model_counts_loop_bodies_times_passes():
    code = sass_report.parse_listing(LOOPS_SASS)["_Z4scanPf"]
    plan = sass_report.KernelPlan(kernel="scan",
                                  loops=[("outer", "walk", 2), ("inner", "stage", 5)],
                                  body_phases={}, modality_loops=("outer",), warps=3,
                                  launch=(1, 96, 0), states=2, row_lanes=2)
    phases, per_loop = sass_report.model_kernel(code, plan, M=2)
    # outer, per pass: 17 instructions less the third modality (2) and the round of offset
    # 16 (1, >= 2 lanes); inner: 4 per pass; outside: MOV and EXIT (the idle branch and NOP
    # after it do not run). Each times the passes per warp and 3 warps.
    assert per_loop == [("outer", 17, 14.0, 2), ("inner", 4, 4.0, 5)]
    assert phases["walk"] == {"instructions": 14 * 2 * 3, "exponentials": 4 * 2 * 3,
                              "shuffles": 1 * 2 * 3, "barriers": 1 * 2 * 3, "spills": 1 * 2 * 3}
    assert phases["stage"] == {"instructions": 4 * 5 * 3}
    assert phases["setup and end"] == {"instructions": 2 * 3}
    phases_one, _ = sass_report.model_kernel(code, plan, M=1)  # the second modality skipped too
    assert phases_one["walk"]["exponentials"] == 2 * 2 * 3
    wrong = sass_report.KernelPlan(kernel="scan", loops=[("outer", "walk", 2)], body_phases={},
                                   modality_loops=(), warps=1, launch=(1, 32, 0), states=2)
    with pytest.raises(ValueError, match="expects 1 loops"):
        sass_report.model_kernel(code, wrong, M=2)


def test_strided_trips_per_warp():
    # 256 threads, 384 items: warps 0-3 make two passes (items 256-383), 4-7 one; batched by
    # 4 (one pass, stride 1024) slot 0 runs in all 8 warps, slot 1 in warps 0-3: 12 of 32
    assert sass_report.strided_trips(384, 256) == (4 * 2 + 4 * 1) / 8
    assert sass_report.strided_trips(600, 256) == (3 + 3 + 3 + 2 + 2 + 2 + 2 + 2) / 8
    assert sass_report.strided_trips(384, 256, batch=4) == 12 / 4 / 8
    assert sass_report.strided_trips(0, 256) == 0


def test_launch_plans_follow_the_launchers():
    # docs/kernels.md: on an H100 / H200 the forward's tile is 32 steps at (a) and (c);
    # (a) has 2^21 lanes with 8 states per lane, so it takes 8, (c) 4.
    fwd_a = sass_report.forward_plan(sass_report.CASES["a"])
    assert fwd_a.kernel.endswith("<__nv_bfloat16, 4, 8>")
    assert fwd_a.loops[0] == ("tile", "staging: B, C", 2)
    fwd_c = sass_report.forward_plan(sass_report.CASES["c"])
    assert fwd_c.kernel.endswith("<__nv_bfloat16, 4, 4>") and fwd_c.loops[0][2] == 4096 // 32
    # backward at (a): N = 64 over 16 lanes of 4 states, 8 state warps of 2 lanes a row:
    # 16 rows a block, 1024·256/16 blocks of 8 warps; L = 50 in 7 segments of 8 steps
    bwd_a = sass_report.backward_plan(sass_report.CASES["a"])
    assert bwd_a.kernel.endswith("<__nv_bfloat16, 4, 4, 2>") and bwd_a.warps == 1024 * 16 * 8
    loops = {name: passes for name, _, passes in bwd_a.loops}
    assert loops["checkpoints"] == 6 and loops["segment"] == 50 / 8
    bwd_c = sass_report.backward_plan(sass_report.CASES["c"])
    assert bwd_c.kernel.endswith("<__nv_bfloat16, 4, 4, 1>")


def test_memory_of_case_c():
    # (c) M=2 batch 8 dim 1536 L=4096 N=16, bf16: 64 chunk states of 16 floats per row,
    # ŷ of 2 bytes per (m, b, e, t); the backward's 32 rows a block give 48 blocks a batch
    # index, each with its own dB and dC slot when deterministic
    memory = sass_report.memory_bytes(sass_report.CASES["c"])
    rows, chunk_states = 2 * 8 * 1536 * 4096 * 2, 8 * 1536 * 64 * 16 * 4
    assert memory["saved"] == rows + chunk_states
    assert memory["full_states"] == 8 * 1536 * 16 * 4096 * 4
    dBC = 2 * 8 * 16 * 4096 * 4
    assert memory["deterministic"] == (2 * dBC * 48 + 8 * (2 * 1536 * 16 * 4 + 2 * 2 * 1536 * 4)
                                       + 8 * 48 * 4 * 2 * 4)
