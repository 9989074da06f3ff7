"""What nvcc makes of the CUDA kernels, without a GPU: ptxas' registers and spills, the
machine code (SASS) per region, and a static performance model built on it.

Per file (the default): per kernel, ptxas' registers and spill bytes, then the SASS cut at
its barriers into regions, with the instructions, spill loads / stores (LDL / STL),
shuffles and special-function operations in each (static counts: a region inside a loop
runs many times, a branch skips code):

    python bench/sass_report.py csrc/cuda/coupled_scan_bwd_state_lanes.cu \\
        --kernel "__nv_bfloat16, 4, 4, 2" [--arch sm_90] [-D NAME=VALUE ...]

--kernel keeps the kernels whose demangled name contains that text (the template
arguments above: bf16, at most 4 modalities, 4 states per lane, Rw = 2).

The static performance model (--model): compiles the state-lanes kernels for sm_90, finds
the loops in each kernel's SASS (back edges: branches to a lower address), and counts how
often every instruction runs at the benchmark's cases (a), (b), (c) (bf16, gated, D, Δ
bias, softplus): the trip count of its innermost loop, from the kernel's launch plan and
loop structure (ForwardModel / BackwardModel below), times the chance that the forward
branches around it let it run (`skip_probability`). Printed per phase: warp-instructions,
exponentials (MUFU.EX2), shuffles, barriers, spill loads and stores, atomics, each per
element (one m, b, e, t, n) and per lane, i.e. warp-instructions·32 / (M·batch·dim·L·N),
and the time if the kernel issued one warp-instruction per cycle on every scheduler of an
H200 (1.045·10^12 per second):

    python bench/sass_report.py --model [--cases a,c] [--loops] [--sass-dir DIR] [--json PATH]

--sass-dir keeps the compiled listings there and reuses them on the next run (delete it
after a kernel change). docs/kernels.md ("Static performance model") says what the model
leaves out. Both views need nvcc (CUDA_HOME or PATH), cuobjdump (the CUDA toolkit's, PATH's,
the nvidia-cuda-cuobjdump wheel's or the one Triton ships) and c++filt.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
SASS_FUNCTION = re.compile(r"Function : (\w+)")
# "/*0a50*/   @!P0 STL.64 [R1+0x120], R44 ;": address, predicate, opcode, modifiers, operands.
SASS_INSTRUCTION = re.compile(
    r"^\s+/\*([0-9a-f]+)\*/\s+(@!?U?P[0-9T]\s+)?([A-Z0-9_]+)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")
COUNTED = ("LDL", "STL", "SHFL", "MUFU")
# Warp-instructions an H200 issues per second at most: 132 multiprocessors × 4 schedulers ×
# 1.98 GHz (an H100 SXM: 132 × 4 × 1.98 GHz as well).
ISSUE_RATE = 1.045e12


@dataclass
class Instruction:
    address: int
    predicated: bool
    opcode: str    # "MUFU"
    name: str      # with its modifiers: "MUFU.EX2"
    operands: str  # "R53, R22"

    def branch_target(self) -> int | None:
        """Where a BRA goes, or None for any other instruction."""
        if self.opcode != "BRA":
            return None
        m = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(m[1], 16) if m else None


def parse_listing(text) -> dict:
    """cuobjdump -sass's listing: {mangled kernel: [Instruction, in address order]}."""
    kernels = {}
    current = None
    for line in text.splitlines():
        if m := SASS_FUNCTION.search(line):
            current = kernels.setdefault(m.group(1), [])
            continue
        m = SASS_INSTRUCTION.match(line)
        if current is None or m is None:
            continue
        current.append(Instruction(int(m[1], 16), m[2] is not None, m[3], m[3] + m[4],
                                   m[5].strip()))
    return kernels


def parse_sass(text) -> dict:
    """cuobjdump -sass's listing: {mangled kernel: [Counter per region]}, a region ending
    with each barrier (BAR) of the kernel."""
    kernels = defaultdict(list)
    for kernel, code in parse_listing(text).items():
        regions = kernels[kernel]
        regions.append(Counter())
        for ins in code:
            regions[-1]["instructions"] += 1
            if ins.opcode in COUNTED:
                regions[-1][ins.opcode] += 1
            if ins.opcode == "BAR":
                regions.append(Counter())
    return kernels


# --- loops and branches ---------------------------------------------------------------

@dataclass
class Loop:
    first: int  # index of the loop's head (the back edge's target)
    last: int   # index of its last back edge
    children: list = field(default_factory=list)


def find_loops(code) -> list:
    """The loops of one kernel, outermost first: a loop spans a back edge's target to the
    branch (the last, when several branches go back to one head: `continue`). Loops nest
    (a loop that overlaps another without nesting is an error). The idle `BRA self` after
    the final EXIT is not a loop."""
    index = {ins.address: i for i, ins in enumerate(code)}
    ends = {}
    for i, ins in enumerate(code):
        target = ins.branch_target()
        if target is None or target > ins.address:
            continue
        if target == ins.address and not ins.predicated:
            continue
        head = index[target]
        ends[head] = max(ends.get(head, i), i)
    roots, open_loops = [], []
    for first, last in sorted(ends.items()):
        while open_loops and open_loops[-1].last < first:
            open_loops.pop()
        loop = Loop(first, last)
        if open_loops:
            if last > open_loops[-1].last:
                raise ValueError(f"loops at {code[first].address:#x} and "
                                 f"{code[open_loops[-1].first].address:#x} overlap without nesting")
            open_loops[-1].children.append(loop)
        else:
            roots.append(loop)
        open_loops.append(loop)
    return roots


def flatten(loops) -> list:
    """The loops in address order (a loop before the loops inside it)."""
    out = []
    for loop in loops:
        out.append(loop)
        out.extend(flatten(loop.children))
    return out


def innermost_loops(code, loops) -> list:
    """For each instruction, the index (in flatten(loops)) of its innermost loop, or None."""
    owner = [None] * len(code)
    for k, loop in enumerate(flatten(loops)):  # inner loops come later and overwrite
        for i in range(loop.first, loop.last + 1):
            owner[i] = k
    return owner


def forward_branches(code) -> list:
    """(index of branch, index of its target) of every predicated forward branch: the code
    in between runs only when the branch is not taken."""
    index = {ins.address: i for i, ins in enumerate(code)}
    out = []
    for i, ins in enumerate(code):
        target = ins.branch_target()
        if target is not None and ins.predicated and target > ins.address and target in index:
            out.append((i, index[target]))
    return out


def shuffle_round_offset(code, branch, target) -> int | None:
    """The lane offset of the one butterfly shuffle a short forward branch skips (a round of
    a sum over lanes whose count is known only at run time), or None."""
    skipped = code[branch + 1:target]
    shuffles = [ins for ins in skipped if ins.name == "SHFL.BFLY"]
    if len(skipped) > 4 or len(shuffles) != 1:
        return None
    return int(shuffles[0].operands.split(",")[3], 16)


def modality_guards(code, branches, owner, loops_with_modalities, states) -> dict:
    """{branch index: modalities before it} for the guards of an unrolled loop over
    modalities ("if (m >= M) break"): predicated forward branches inside one of
    `loops_with_modalities` (indices into flatten(loops)) that share one target, where the
    code between consecutive guards holds either no exponential or one modality's: one per
    state of the lane (`states`). A guard with k such groups before it skips the rest when
    M <= k. (Guards of an unrolled loop over steps hold all modalities' exponentials
    between them and are left alone.)"""
    by_target = defaultdict(list)
    for branch, target in branches:
        if owner[branch] in loops_with_modalities and owner[target] == owner[branch]:
            by_target[target].append(branch)
    guards = {}
    for target, group in by_target.items():
        group.sort()
        ends = group[1:] + [target]
        exps = [sum(ins.name == "MUFU.EX2" for ins in code[g:e]) for g, e in zip(group, ends)]
        sizes = {n for n in exps if n}
        if len(group) < 2 or sizes != {states} or sum(1 for n in exps if n) < 2:
            continue
        before = 0
        for g, n in zip(group, exps):
            guards[g] = before
            before += 1 if n else 0
    return guards


def instruction_weights(code, owner, skip_probability) -> list:
    """How often each instruction runs per pass through its innermost loop's body: the
    product, over the forward branches around it, of the chance that the branch lets the
    code run (skip_probability(branch, target) -> probability the skipped code runs)."""
    weights = [1.0] * len(code)
    for branch, target in forward_branches(code):
        p = skip_probability(branch, target)
        if p != 1.0:
            for i in range(branch + 1, target):
                weights[i] *= p
    return weights


# --- the kernels' launch plans, as the launchers compute them ----------------------------

def source_constant(path, name) -> int:
    """An integer constant of the sources: `constexpr int NAME = V;` or `#define NAME V`."""
    text = (ROOT / path).read_text()
    m = (re.search(rf"constexpr int {name} = (\d+);", text)
         or re.search(rf"#define {name} (\d+)", text))
    if m is None:
        raise ValueError(f"{path} defines no integer {name}")
    return int(m[1])


FWD_FILE = "csrc/cuda/coupled_scan_fwd_state_lanes.cu"
BWD_FILE = "csrc/cuda/coupled_scan_bwd_state_lanes.cu"
CHUNK = source_constant("include/coupled_mamba/params.h", "kChunkLen")
STAGE_BATCH = source_constant("csrc/cuda/scan_cuda_common.cuh", "kStageBatch")
FWD_THREADS = source_constant(FWD_FILE, "COUPLED_MAMBA_FWD_LANE_THREADS")
FWD_MIN_BLOCKS = source_constant(FWD_FILE, "COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS")
BWD_MAX_STATE_WARPS = source_constant(BWD_FILE, "kBwdMaxStateWarps")
BWD_STAGE_BATCH = source_constant(BWD_FILE, "kBatch")
# stage_bc<input_t, 16> in the forward kernel; stage_steps' batch is 8 with 128 registers.
FWD_BC_BATCH = 16
FWD_STEP_BATCH = 8 if 65536 // (FWD_THREADS * FWD_MIN_BLOCKS) >= 128 else 4
# An H100 / H200: 228 KB per multiprocessor, 227 KB per block, 1 KB reserved per block.
SMEM_PER_SM, SMEM_PER_BLOCK, SMEM_RESERVED = 228 * 1024, 227 * 1024, 1024


@dataclass(frozen=True)
class Case:
    name: str
    M: int
    batch: int
    dim: int
    L: int
    N: int

    @property
    def elements(self):
        return self.M * self.batch * self.dim * self.L * self.N


CASES = {c.name: c for c in (Case("a", 3, 1024, 256, 50, 64), Case("b", 3, 16, 256, 1000, 64),
                             Case("c", 2, 8, 1536, 4096, 16))}


@dataclass
class Geometry:
    """LaneGeometry of state_lanes.cuh."""
    R: int
    Rw: int
    Ws: int
    rows: int
    Np: int
    threads: int
    blocks: int

    @classmethod
    def of(cls, case, k_states, threads, state_warps):
        R = 1
        while R < 32 and R * k_states < case.N:
            R *= 2
        Ws = min(state_warps, R)
        Rw = R // Ws
        rows = (threads // 32 // Ws) * (32 // Rw)
        return cls(R, Rw, Ws, rows, R * k_states, threads, case.batch * -(-case.dim // rows))


def strided_trips(total, threads, batch=1) -> float:
    """Passes of `for (first = threadIdx.x; first < total; first += batch·threads)` a warp
    makes, on average over the block's warps (a warp runs while any of its lanes does). With
    batch > 1 the body is unrolled over j = first + i·threads, i < batch, and a slot whose j
    is past the end for every lane of the warp is skipped by a uniform branch: a pass then
    counts as the share of its slots that run (the staging loops)."""
    warps = threads // 32
    slots = 0
    for w in range(warps):
        for first in range(32 * w, total, batch * threads):
            slots += sum(1 for i in range(batch) if first + i * threads < total)
    return slots / batch / warps


@dataclass
class KernelPlan:
    """What the model needs of one launch: the kernel, how often each of its loops runs,
    and which phase each loop's instructions belong to."""
    kernel: str               # text in the instantiation's demangled name
    loops: list               # (loop name, phase, passes per warp over the launch), address order
    body_phases: dict         # loop name -> phases of its own code, cut at its barriers
    modality_loops: tuple     # loops holding an unrolled loop over modalities
    warps: int
    launch: tuple             # (blocks, threads, dynamic shared memory bytes)
    states: int               # per lane: the exponentials of one modality's step
    row_lanes: int = 0        # lanes of a row's run-time sum (row_sum), 0 if compiled in
    rare_stores: float = 1.0  # the share of steps on which the step loop saves a state


def forward_plan(case) -> KernelPlan:
    """coupled_scan_fwd_state_lanes.cu's launch at `case` (bf16, gated)."""
    lanes_with_8 = case.batch * case.dim * -(-case.N // 8)
    k_states = 8 if case.N > 128 or lanes_with_8 >= 1 << 20 else 4
    g = Geometry.of(case, k_states, FWD_THREADS, 1)
    bc_stride = 2 * case.M * g.Np + 4
    dd_stride = 2 * case.M * g.rows + 2
    y_stride = (case.M * g.rows) | 1
    per_step = (bc_stride + dd_stride + 2 * y_stride) * 4
    budget = min(SMEM_PER_SM // FWD_MIN_BLOCKS - SMEM_RESERVED, SMEM_PER_BLOCK)
    T = CHUNK
    while T > 1 and T * per_step > budget:
        T //= 2
    while T > 1 and T // 2 >= case.L:
        T //= 2
    tiles = -(-case.L // T)
    rows_steps = case.M * g.rows * T
    return KernelPlan(
        kernel=f"coupled_scan_fwd_state_lanes_kernel<__nv_bfloat16, 4, {k_states}>",
        loops=[("tile", "staging: B, C", tiles),
               ("stage B, C", "staging: B, C",
                tiles * strided_trips(2 * case.M * g.Np * T, g.threads, FWD_BC_BATCH)),
               ("stage rows", "staging: rows",
                tiles * strided_trips(rows_steps, g.threads, FWD_STEP_BATCH)),
               ("steps", "step loop", case.L),
               ("epilogue, gated", "epilogue", tiles * strided_trips(rows_steps, g.threads)),
               ("epilogue, ungated", "epilogue", 0)],
        body_phases={"tile": ("staging: B, C", "staging: rows", "step loop", "epilogue")},
        modality_loops=("steps",), warps=g.blocks * g.threads // 32,
        launch=(g.blocks, g.threads, T * per_step), states=k_states,
        row_lanes=g.Rw,
        rare_stores=-(-case.L // CHUNK) / case.L)


def backward_plan(case) -> KernelPlan:
    """coupled_scan_bwd_state_lanes.cu's launch at `case` (bf16, gated, 4 states per lane)."""
    if case.N > 128:
        raise ValueError("the model covers the backward with 4 states per lane (N <= 128)")
    k_states, seg = 4, 32 // 4
    R = 1
    while R < 32 and R * k_states < case.N:
        R *= 2
    state_warps = min(R, BWD_MAX_STATE_WARPS)
    g = Geometry.of(case, k_states, 32 * state_warps, state_warps)
    chunks = -(-case.L // CHUNK)
    segments = [-(-min(CHUNK, case.L - c * CHUNK) // seg) for c in range(chunks)]
    walks = sum(segments)
    checkpoint_walks = walks - chunks  # the last segment of a chunk keeps a checkpoint only
    steps = case.L
    threads, pairs = g.threads, case.M * g.rows
    bc_stride = 2 * case.M * g.Np + 4
    per_pair = strided_trips(pairs, threads)
    st_stride, sum_stride = 4 * pairs + 4, 2 * pairs * g.Ws + 2
    smem_floats = (seg * (2 * bc_stride + st_stride + sum_stride)
                   + CHUNK // seg * k_states * threads + 2 * pairs)
    sums_by_16, sums_left = divmod(g.Ws, 16)
    sums_one_by_one = sums_left - 4 if sums_left >= 4 else sums_left  # after one pass of 4
    return KernelPlan(
        kernel=f"coupled_scan_bwd_state_lanes_kernel<__nv_bfloat16, 4, 4, {g.Rw}>",
        loops=[("zero dB, dC", "setup and end", strided_trips(seg * bc_stride, threads)),
               ("zero dD", "setup and end", strided_trips(2 * pairs, threads)),
               ("chunk", "checkpoint pass", chunks),
               ("checkpoints", "checkpoint pass", checkpoint_walks),
               ("checkpoint stage B", "checkpoint pass",
                checkpoint_walks * strided_trips(case.M * g.Np * seg, threads, STAGE_BATCH)),
               ("checkpoint stage rows", "checkpoint pass",
                checkpoint_walks * strided_trips(pairs * seg, threads, BWD_STAGE_BATCH)),
               # The walk's unrolled steps past a short last segment are skipped (branches
               # on the step count): its body counts as steps / kSeg passes.
               ("segment", "recompute + walk", steps / seg),
               ("stage B, C", "staging",
                walks * strided_trips(2 * case.M * g.Np * seg, threads, STAGE_BATCH)),
               ("stage rows", "staging",
                walks * strided_trips(pairs * seg, threads, BWD_STAGE_BATCH)),
               ("epilogue rows", "epilogue: dΔ, du", walks * per_pair),
               ("epilogue steps, no state warps", "epilogue: dΔ, du", 0),
               ("epilogue steps", "epilogue: dΔ, du", steps * per_pair),
               ("state-warp sums by 16", "epilogue: dΔ, du", steps * per_pair * sums_by_16),
               ("state-warp sums", "epilogue: dΔ, du", steps * per_pair * sums_one_by_one),
               ("dB, dC atomics", "dB, dC atomics",
                walks * strided_trips(2 * case.M * g.Np * seg, threads)),
               ("write dδ, du", "write dδ, du", walks * strided_trips(pairs * seg, threads)),
               ("dD atomics", "setup and end", per_pair)],
        body_phases={"segment": ("staging", "staging", "recompute + walk", "epilogue: dΔ, du",
                                 "write dδ, du")},
        modality_loops=("checkpoints", "segment"), warps=g.blocks * threads // 32,
        launch=(g.blocks, threads, 4 * smem_floats), states=k_states)


def memory_bytes(case, input_bytes=2) -> dict:
    """What the op allocates at `case` (gated, D and Δ bias; inputs of `input_bytes`), from
    csrc/coupled_scan.cpp and register_cuda.cpp: {saved: what forward keeps for backward
    beyond its inputs (the chunk states and ŷ), forward: all forward outputs, backward: all
    gradients, deterministic: the backward's extra slots under
    torch.use_deterministic_algorithms, full_states: batch·dim·N·L floats, the size none
    may reach}."""
    M, batch, dim, L, N = case.M, case.batch, case.dim, case.L, case.N
    rows = M * batch * dim * L * input_bytes           # y, ŷ, du, dδ, dz: (M, batch, dim, L)
    chunk_states = batch * dim * -(-L // CHUNK) * N * 4
    states = batch * dim * N * 4                       # final state, its gradient
    dBC = M * batch * N * L * 4                        # dB, dC each, float32
    small = M * dim * N * 4 + 2 * M * dim * 4          # dA; dD, dΔ-bias
    g = backward_plan(case)
    blocks_per_batch = g.launch[0] // batch
    return dict(saved=chunk_states + rows, forward=2 * rows + chunk_states + states,
                backward=3 * rows + 2 * dBC + states + small,
                deterministic=2 * dBC * blocks_per_batch + batch * small
                + g.warps * M * 4,
                full_states=batch * dim * N * L * 4)


# --- counting --------------------------------------------------------------------------

METRICS = ("instructions", "exponentials", "shuffles", "barriers", "spills", "atomics")
ATOMICS = ("RED", "REDG", "ATOM", "ATOMG", "ATOMS")


def metric_counts(ins) -> list:
    """The metrics one instruction adds to (each counts 1)."""
    out = ["instructions"]
    if ins.name.startswith("MUFU.EX2"):
        out.append("exponentials")
    if ins.opcode == "SHFL":
        out.append("shuffles")
    if ins.opcode == "BAR":
        out.append("barriers")
    if ins.opcode in ("LDL", "STL"):
        out.append("spills")
    if ins.opcode in ATOMICS:
        out.append("atomics")
    return out


def model_kernel(code, plan, M) -> tuple:
    """({phase: Counter of METRICS}, [per loop: (name, static instructions, instructions per
    pass, passes per warp)]): the metrics in warp-instructions over the whole launch."""
    roots = find_loops(code)
    loops = flatten(roots)
    if len(loops) != len(plan.loops):
        found = ", ".join(f"{code[l.first].address:#x}-{code[l.last].address:#x} "
                          f"({l.last - l.first + 1})" for l in loops)
        raise ValueError(f"{plan.kernel}: the model expects {len(plan.loops)} loops "
                         f"({', '.join(n for n, _, _ in plan.loops)}), the SASS has {len(loops)}: "
                         f"{found}; update forward_plan / backward_plan")
    names = [name for name, _, _ in plan.loops]
    owner = innermost_loops(code, roots)
    branches = forward_branches(code)
    guards = modality_guards(code, branches, owner,
                             {names.index(n) for n in plan.modality_loops}, plan.states)
    steps_loop = names.index("steps") if "steps" in names else None

    def skip_probability(branch, target):
        if branch in guards:
            return 0.0 if guards[branch] >= M else 1.0
        offset = shuffle_round_offset(code, branch, target)
        if offset is not None and plan.row_lanes:
            return 1.0 if offset < plan.row_lanes else 0.0
        skipped = code[branch + 1:target]
        if (owner[branch] == steps_loop and any(i.opcode == "STG" for i in skipped)
                and not any(i.name.startswith("MUFU.EX2") for i in skipped)):
            return plan.rare_stores  # the chunk-start save of the coupled state
        return 1.0

    weights = instruction_weights(code, owner, skip_probability)
    for i, ins in enumerate(code):  # from the idle `BRA self` after the last EXIT: padding
        if ins.branch_target() == ins.address and not ins.predicated:
            weights[i:] = [0.0] * (len(code) - i)
            break
    per_loop = [(name, sum(1 for k in owner if k == j),
                 sum(w for w, k in zip(weights, owner) if k == j), passes)
                for j, (name, _, passes) in enumerate(plan.loops)]
    barriers_seen = Counter()
    phases = defaultdict(Counter)
    for i, ins in enumerate(code):
        k = owner[i]
        name, phase, passes = plan.loops[k] if k is not None else ("", "setup and end", 1)
        if name in plan.body_phases:
            parts = plan.body_phases[name]
            phase = parts[min(barriers_seen[name], len(parts) - 1)]
        for metric in metric_counts(ins):
            phases[phase][metric] += weights[i] * passes * plan.warps
        if ins.opcode == "BAR" and name in plan.body_phases:
            barriers_seen[name] += 1
    return phases, per_loop


def print_model(title, case, phases, per_loop, warps) -> float:
    """One table: per phase, each metric per element, and the issue-bound time; with
    per_loop, each loop's own instructions (static, per pass as weighted by the branches),
    passes per warp and share per element. Returns the instructions per element."""
    per = 32 / case.elements
    print(f"\n{title}")
    if per_loop:
        print(f"  {'loop':<32}{'static':>8}{'per pass':>10}{'passes':>10}{'per element':>13}")
        for name, static, weighted, passes in per_loop:
            print(f"  {name:<32}{static:>8}{weighted:>10.1f}{passes:>10.2f}"
                  f"{weighted * passes * warps * per:>13.2f}")
    print(f"  {'phase':<18}" + "".join(f"{m:>13}" for m in METRICS) + f"{'issue ms':>10}")
    total = sum(phases.values(), Counter())
    for phase, counts in [*phases.items(), ("all", total)]:
        print(f"  {phase:<18}" + "".join(f"{counts[m] * per:>13.2f}" for m in METRICS)
              + f"{counts['instructions'] / ISSUE_RATE * 1e3:>10.3f}")
    return total["instructions"] * per


# --- tools and compilation ---------------------------------------------------------------

def find_tool(name, cuda_home):
    """The CUDA toolkit's, else PATH's, else (cuobjdump) the one of the nvidia-cuda-cuobjdump
    wheel or the copy bundled with Triton."""
    candidates = [Path(cuda_home) / "bin" / name] if cuda_home else []
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
    wheels = importlib.util.find_spec("nvidia")
    if wheels is not None and wheels.submodule_search_locations:
        for location in wheels.submodule_search_locations:
            candidates.extend(sorted(Path(location).glob(f"*/bin/{name}")))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    sys.exit(f"sass_report: {name} not found (looked in {[str(c) for c in candidates]}); "
             "set CUDA_HOME to the CUDA toolkit")


def demangle(names):
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def compile_file(nvcc, source, arch, defines, obj):
    command = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v",
               f"-I{ROOT / 'include'}", *[f"-D{d}" for d in defines], "-c", str(source),
               "-o", str(obj)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"sass_report: nvcc failed:\n{run.stderr[-3000:]}")
    return parse_ptxas(run.stderr)


def parse_ptxas(text) -> dict:
    """ptxas -v's report: {mangled kernel: {registers, stack, spill_stores, spill_loads}}."""
    ptxas = {}
    current = None
    for line in text.splitlines():
        if m := PTXAS_ENTRY.search(line):
            current = m.group(1)
            ptxas[current] = {}
        elif current and (m := PTXAS_SPILL.search(line)):
            ptxas[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif current and (m := PTXAS_REGS.search(line)):
            ptxas[current]["registers"] = int(m[1])
    return ptxas


def sass_listing(cuobjdump, obj):
    return subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                          check=True).stdout


def report_file(args):
    source = Path(args.source)
    if not source.is_file():
        sys.exit(f"sass_report: source: no such file {source}")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = find_tool("nvcc", cuda_home)
    cuobjdump = find_tool("cuobjdump", cuda_home)
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "kernels.o"
        ptxas = compile_file(nvcc, source, args.arch, args.defines, obj)
        regions = parse_sass(sass_listing(cuobjdump, obj))
    names = demangle(sorted(set(ptxas) | set(regions)))
    shown = [k for k in sorted(regions, key=lambda k: names[k]) if args.kernel in names[k]]
    if not shown:
        sys.exit(f"sass_report: no kernel's name contains {args.kernel!r}; kernels:\n  "
                 + "\n  ".join(sorted(names.values())))
    print(f"{source} for {args.arch}" + (f", -D {' -D '.join(args.defines)}" if args.defines else ""))
    for mangled in shown:
        p = ptxas.get(mangled, {})
        print(f"\n{names[mangled]}")
        print(f"  ptxas: {p.get('registers', '?')} registers, stack {p.get('stack', '?')} bytes, "
              f"spill stores {p.get('spill_stores', '?')} / loads {p.get('spill_loads', '?')} bytes")
        print(f"  {'region':>6} {'instructions':>12} " + " ".join(f"{c:>5}" for c in COUNTED))
        for i, counts in enumerate(regions[mangled]):
            print(f"  {i:>6} {counts['instructions']:>12} "
                  + " ".join(f"{counts[c]:>5}" for c in COUNTED))
        total = sum(regions[mangled], Counter())
        print(f"  {'all':>6} {total['instructions']:>12} " + " ".join(f"{total[c]:>5}" for c in COUNTED))


def kernels_of(source, sass_dir) -> dict:
    """{demangled name: [Instruction]} of one source file for sm_90, compiled here or read
    from sass_dir (where a compile also leaves its listing)."""
    listing = Path(sass_dir) / (Path(source).stem + ".sass") if sass_dir else None
    if listing is not None and listing.is_file():
        text = listing.read_text()
    else:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        with tempfile.TemporaryDirectory() as tmp:
            obj = Path(tmp) / "kernels.o"
            compile_file(find_tool("nvcc", cuda_home), ROOT / source, "sm_90", [], obj)
            text = sass_listing(find_tool("cuobjdump", cuda_home), obj)
        if listing is not None:
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text(text)
    code = parse_listing(text)
    names = demangle(sorted(code))
    return {names[k]: v for k, v in code.items()}


def kernel_code(kernels, plan):
    found = [code for name, code in kernels.items() if plan.kernel in name]
    if len(found) != 1:
        sys.exit(f"sass_report: {len(found)} kernels named like {plan.kernel!r}")
    return found[0]


def report_model(args):
    cases = [CASES[c] for c in args.cases.split(",")]
    fwd = kernels_of(FWD_FILE, args.sass_dir)
    bwd = kernels_of(BWD_FILE, args.sass_dir)
    summary, report = [], []
    for case in cases:
        shape = f"M={case.M} batch={case.batch} dim={case.dim} L={case.L} N={case.N}"
        totals = []
        for direction, plan_of, kernels in (("forward", forward_plan, fwd),
                                            ("backward", backward_plan, bwd)):
            plan = plan_of(case)
            phases, per_loop = model_kernel(kernel_code(kernels, plan), plan, case.M)
            title = f"({case.name}) {shape}, {direction}: {plan.kernel}, {plan.warps} warps"
            totals.append(print_model(title, case, phases, per_loop if args.loops else None,
                                      plan.warps))
            per = 32 / case.elements
            report.append(dict(case=case.name, shape=shape, direction=direction,
                               kernel=plan.kernel, warps=plan.warps,
                               per_element={phase: {m: counts[m] * per for m in METRICS}
                                            for phase, counts in phases.items()},
                               issue_ms=sum(c["instructions"] for c in phases.values())
                               / ISSUE_RATE * 1e3))
        summary.append((case, *totals))
    print("\nwarp-instructions per element (·32 / elements), issue-bound ms at "
          f"{ISSUE_RATE:.4g}/s")
    print(f"  {'case':<6}{'forward':>9}{'ms':>8}{'backward':>10}{'ms':>8}")
    for case, fwd_total, bwd_total in summary:
        ms = case.elements / 32 / ISSUE_RATE * 1e3
        print(f"  ({case.name})  {fwd_total:>8.1f}{fwd_total * ms:>8.3f}{bwd_total:>10.1f}"
              f"{bwd_total * ms:>8.3f}")
    print("\nallocated by the op, MB (bf16 inputs): saved = chunk states + ŷ, kept by forward "
          "for backward;\nforward / backward = all their outputs; deterministic = the "
          "backward's extra slots; batch·dim·N·L floats for scale")
    print(f"  {'case':<6}" + "".join(f"{k:>15}" for k in memory_bytes(cases[0])))
    for case in cases:
        memory = memory_bytes(case)
        print(f"  ({case.name})  " + "".join(f"{v / 1e6:>15.1f}" for v in memory.values()))
        report.append(dict(case=case.name, memory_bytes=memory))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?",
                        help="a .cu file, e.g. csrc/cuda/coupled_scan_bwd_state_lanes.cu")
    parser.add_argument("--kernel", default="", help="keep kernels whose demangled name contains this")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="a macro for the build, e.g. COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS=3")
    parser.add_argument("--model", action="store_true",
                        help="the static performance model of the state-lanes kernels (no source)")
    parser.add_argument("--cases", default="a,b,c", help="of the model: a, b, c, comma-separated")
    parser.add_argument("--sass-dir", help="of the model: keep and reuse the SASS listings here")
    parser.add_argument("--loops", action="store_true", help="of the model: each loop's counts too")
    parser.add_argument("--json", help="of the model: write its numbers to this file")
    args = parser.parse_args()
    if args.model:
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if args.source or unknown:
            parser.error(f"--model takes no source and cases among {sorted(CASES)}; got "
                         f"source {args.source!r}, cases {args.cases!r}")
        report_model(args)
    elif args.source:
        report_file(args)
    else:
        parser.error("source: a .cu file, or --model")


if __name__ == "__main__":
    main()
