"""x86 instructions per element of the CPU scan kernels, counted by valgrind's callgrind: a
cost meter that, unlike a timing, gives the same figure on every run and on a loaded machine.

    python bench/count_instructions.py            # ~2 minutes; needs valgrind and a C compiler

Runs the operator's forward (torch.ops.coupled_mamba.scan) and backward
(torch.ops.coupled_mamba.scan_backward) on one fixed shape, by default M=3, batch 2, dim 32,
L=50, N=64, fp32, every optional input (D, z, delta_bias, softplus), one thread, under
callgrind, and prints the instructions executed per element (m, b, e, t, n) by the
project's own functions (namespace coupled_mamba), in total and per function. Code of other
libraries that those functions call (libc's memset / memcpy, OpenMP, torch's allocator) is
one line of its own, "called from it", not in the total.

Per call, independent of the number of calls: one forward and one backward run first
without instrumentation (lazy initialisation, first-touch allocations); then each measured
call is counted alone (callgrind's statistics are zeroed before it and dumped after it,
through client requests of a small helper library compiled on the spot against valgrind's
callgrind.h), and the meter checks that every measured call gave the same count.

Which vector build ran: the kernels are compiled as AVX-512, AVX2 and SSE2 clones and the
loader picks one from CPUID (docs/kernels.md). Valgrind implements AVX2 but not AVX-512 and
reports a CPU without it, so under callgrind the AVX2 clone runs even on an AVX-512 machine;
the meter names the clone from the functions' symbols. The AVX-512 clone cannot be counted
this way (its instructions would not decode under valgrind); hardware counters
(`perf stat -e instructions:u`) count it where the machine exposes them.
"""
import argparse
import collections
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

PROJECT_NAMESPACE = "coupled_mamba::"
DEFAULT_SHAPE = (3, 2, 32, 50, 64)
CLONES = {"arch_x86_64_v4": "AVX-512 (x86-64-v4)", "arch_x86_64_v3": "AVX2+FMA (x86-64-v3)",
          "default": "SSE2 (baseline)"}
CLIENT_REQUESTS_C = r"""
#include <valgrind/callgrind.h>
void meter_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void meter_zero(void) { CALLGRIND_ZERO_STATS; }
void meter_dump(const char* label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


# ---------------------------------------------------------------------------- inside valgrind
def run_calls(shape: Tuple[int, ...], calls: int, helper: str) -> None:
    """Runs the warm-up, then `calls` counted forwards and `calls` counted backwards, each
    between a zeroing and a dump of callgrind's statistics labelled 'forward' / 'backward'."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_scan import make_inputs  # noqa: E402
    import coupled_mamba_ext  # noqa: F401  (registers the operators)

    torch.set_num_threads(1)
    meter = ctypes.CDLL(helper)
    x = make_inputs(shape, torch.float32, "cpu")
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")] + [
        x["delta_softplus"], x["coupling"], None]
    dy = torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(1))

    def forward():
        return torch.ops.coupled_mamba.scan(*args)

    def backward(saved):
        _, _, chunk_states, y_ungated = saved
        return torch.ops.coupled_mamba.scan_backward(dy, None, *args, chunk_states, y_ungated)

    with torch.no_grad():
        saved = forward()
        backward(saved)
        meter.meter_start()
        for _ in range(calls):
            meter.meter_zero()
            saved = forward()
            meter.meter_dump(b"forward")
        for _ in range(calls):
            meter.meter_zero()
            backward(saved)
            meter.meter_dump(b"backward")


# ---------------------------------------------------------------------------- outside
def build_helper(directory: str) -> str:
    """Compiles the client-request helper; returns the path of the shared library."""
    source = os.path.join(directory, "meter.c")
    library = os.path.join(directory, "libmeter.so")
    with open(source, "w") as f:
        f.write(CLIENT_REQUESTS_C)
    compiler = os.environ.get("CC", "cc")
    result = subprocess.run([compiler, "-O1", "-shared", "-fPIC", source, "-o", library],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit("count_instructions: could not compile the callgrind helper (needs a C "
                 "compiler and valgrind's callgrind.h):\n" + result.stderr)
    return library


def self_costs(path: str) -> Tuple[str, Dict[str, int], int]:
    """Reads one callgrind dump: its trigger label, the exclusive instruction count of each
    function, and the inclusive count of the calls that project functions make into code
    outside the project."""
    names: Dict[str, str] = {}
    costs: Dict[str, int] = collections.defaultdict(int)
    label, current, callee, called_out = "", "", "", 0
    skip_next_cost = False
    positions = 1  # position columns before the cost ("positions: instr line" gives 2)

    def resolve(spec: str) -> str:
        # "(id) name" defines an id, "(id)" refers to one (callgrind's name compression).
        match = re.match(r"\((\d+)\)(?: (.*))?$", spec)
        if not match:
            return spec
        if match.group(2) is not None:
            names[match.group(1)] = match.group(2)
        return names[match.group(1)]

    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("positions:"):
                positions = len(line.split()) - 1
            elif line.startswith("desc: Trigger:"):
                label = line.split("Client Request:", 1)[-1].strip()
            elif line.startswith("fn="):
                current = resolve(line[3:])
            elif line.startswith("cfn="):
                callee = resolve(line[4:])
            elif line.startswith("calls="):
                skip_next_cost = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                fields = line.split()
                cost = int(fields[positions]) if len(fields) > positions else 0  # Ir
                if skip_next_cost:  # the inclusive cost of a call
                    skip_next_cost = False
                    if is_project(current) and not is_project(callee):
                        called_out += cost
                else:
                    costs[current] += cost
    return label, dict(costs), called_out


def is_project(function: str) -> bool:
    """True for the project's functions: their qualified name starts in namespace
    coupled_mamba (a return type may come first: 'void coupled_mamba::...'). Templates of
    torch or the standard library instantiated with the project's types are not."""
    return re.match(r"^(?:[\w:<>,* ]+ )?" + re.escape(PROJECT_NAMESPACE), function) is not None


def short_name(function: str) -> str:
    """'void coupled_mamba::(anonymous namespace)::scan_chunk_forward<float>(long, ...)
    [clone .arch_x86_64_v3]' -> 'scan_chunk_forward<float>'; lambdas keep their owner."""
    name = re.sub(r" \[clone [^\]]*\]", "", function)
    name = re.sub(r"^[\w:<>,* ]+ (?=coupled_mamba::)", "", name)
    name = name.replace("coupled_mamba::", "").replace("(anonymous namespace)::", "")
    depth, out = 0, []
    for ch in name:  # drop parameter lists, keep template arguments
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return re.sub(r"::\{lambda#1\}::operator\s*(const)?", " (its parallel body)",
                  "".join(out)).strip()


def clone_of(function: str) -> str:
    match = re.search(r"\[clone \.(arch_x86_64_v[34])", function)
    return match.group(1) if match else ""


def summarise(dumps: List[str], elements: int) -> Dict[str, dict]:
    """Per phase ('forward', 'backward'): the per-call project total, its calls' spread, the
    per-function figures and the clones seen."""
    phases: Dict[str, dict] = {}
    for path in dumps:
        label, costs, called_out = self_costs(path)
        if label not in ("forward", "backward"):
            continue
        project = {f: c for f, c in costs.items() if is_project(f) and c > 0}
        phase = phases.setdefault(label, {"totals": [], "functions": None, "called_out": [],
                                          "clones": set()})
        phase["totals"].append(sum(project.values()))
        phase["called_out"].append(called_out)
        phase["clones"].update(clone_of(f) for f in project if clone_of(f))
        per_function = collections.defaultdict(int)
        for f, c in project.items():
            per_function[short_name(f)] += c
        phase["functions"] = dict(per_function)  # the last call's
    for phase in phases.values():
        phase["per_element"] = phase["totals"][-1] / elements
    return phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=5, metavar=("M", "BATCH", "DIM", "L", "N"),
                        default=list(DEFAULT_SHAPE))
    parser.add_argument("--calls", type=int, default=2,
                        help="counted calls of each direction (default 2); each is counted alone")
    parser.add_argument("--keep", default=None,
                        help="keep callgrind's dumps in this directory (for callgrind_annotate)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.child:
        run_calls(shape, args.calls, args.child)
        return
    if shutil.which("valgrind") is None:
        sys.exit("count_instructions: valgrind is not installed (apt-get install valgrind)")

    work = args.keep or tempfile.mkdtemp(prefix="count_instructions_")
    os.makedirs(work, exist_ok=True)
    helper = build_helper(work)
    out = os.path.join(work, "callgrind.out")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=yes",
               f"--callgrind-out-file={out}", sys.executable, os.path.abspath(__file__),
               "--shape", *map(str, shape), "--calls", str(args.calls), "--child", helper]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit("count_instructions: the run under valgrind failed:\n" + result.stderr[-4000:])
    dumps = sorted((os.path.join(work, f) for f in os.listdir(work)
                    if f.startswith("callgrind.out.")),
                   key=lambda p: int(p.rsplit(".", 1)[-1]))
    M, batch, dim, L, N = shape
    elements = M * batch * dim * L * N
    phases = summarise(dumps, elements)
    if set(phases) != {"forward", "backward"}:
        sys.exit(f"count_instructions: expected forward and backward dumps in {work}, "
                 f"found {sorted(phases)}")

    clones = set().union(*(p["clones"] for p in phases.values()))
    print(f"shape M={M} batch={batch} dim={dim} L={L} N={N}, fp32, 1 thread: "
          f"{elements} elements (m, b, e, t, n)")
    print("vector clone that ran: " + (", ".join(CLONES[c] for c in sorted(clones))
                                       if clones else CLONES["default"]))
    for label, phase in phases.items():
        totals = phase["totals"]
        # Loops that gcc peels to an aligned address run a few more or fewer scalar steps
        # depending on where the allocator put a buffer: calls may differ by a few hundred.
        spread = (max(totals) - min(totals)) / elements
        same = ("the same in each" if spread == 0 else
                f"differing by at most {spread:.4f} per element")
        print(f"\n{label}: {phase['per_element']:.2f} instructions per element "
              f"({totals[-1]} per call; {len(totals)} call{'s' if len(totals) > 1 else ''} "
              f"counted, {same})")
        small = 0
        for name, cost in sorted(phase["functions"].items(), key=lambda kv: -kv[1]):
            if cost >= 0.01 * elements:
                print(f"  {cost / elements:8.3f}  {name}")
            else:
                small += cost
        print(f"  {small / elements:8.3f}  (the other project functions: argument checks, "
              "outputs, set-up)")
        print(f"  {phase['called_out'][-1] / elements:8.3f}  (called from it, not in the "
              "total: libc, OpenMP, torch)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
