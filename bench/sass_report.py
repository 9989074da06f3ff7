"""What nvcc makes of a CUDA kernel file, without a GPU: per kernel, ptxas' registers and
spill bytes, then the machine code (SASS) cut at its barriers into regions, with the
instructions, spill loads / stores (LDL / STL), shuffles and special-function operations
in each. Static counts: a region inside a loop runs many times, a branch skips code, so a
change is compared region by region (docs/kernels.md quotes these counts).

    python bench/sass_report.py csrc/cuda/coupled_scan_bwd_state_lanes.cu \\
        --kernel "__nv_bfloat16, 4, 4, 2" [--arch sm_90] [-D NAME=VALUE ...]

--kernel keeps the kernels whose demangled name contains that text (the template
arguments above: bf16, at most 4 modalities, 4 states per lane, Rw = 2). Needs nvcc
(CUDA_HOME or PATH), cuobjdump (the CUDA toolkit's, else the one Triton ships) and c++filt.
"""
import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
SASS_FUNCTION = re.compile(r"Function : (\w+)")
# "/*0a50*/   @!P0 STL.64 [R1+0x120], R44 ;": the opcode, without predicate and modifiers.
SASS_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)")
COUNTED = ("LDL", "STL", "SHFL", "MUFU")


def find_tool(name, cuda_home):
    """The CUDA toolkit's, else PATH's, else (cuobjdump) the copy bundled with Triton."""
    candidates = [Path(cuda_home) / "bin" / name] if cuda_home else []
    on_path = shutil.which(name)
    if on_path:
        candidates.append(Path(on_path))
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


def parse_ptxas(text):
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


def sass_regions(cuobjdump, obj):
    text = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    return parse_sass(text)


def parse_sass(text):
    """cuobjdump -sass's listing: {mangled kernel: [Counter per region]}, a region ending
    with each barrier (BAR) of the kernel."""
    kernels = defaultdict(list)
    current = None
    for line in text.splitlines():
        if m := SASS_FUNCTION.search(line):
            current = m.group(1)
            kernels[current].append(Counter())
            continue
        m = SASS_INSTRUCTION.match(line)
        if current is None or m is None:
            continue
        opcode = m.group(1)
        region = kernels[current][-1]
        region["instructions"] += 1
        if opcode in COUNTED:
            region[opcode] += 1
        if opcode == "BAR":
            kernels[current].append(Counter())
    return kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a .cu file, e.g. csrc/cuda/coupled_scan_bwd_state_lanes.cu")
    parser.add_argument("--kernel", default="", help="keep kernels whose demangled name contains this")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="a macro for the build, e.g. COUPLED_MAMBA_FWD_LANE_MIN_BLOCKS=3")
    args = parser.parse_args()
    source = Path(args.source)
    if not source.is_file():
        sys.exit(f"sass_report: source: no such file {source}")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = find_tool("nvcc", cuda_home)
    cuobjdump = find_tool("cuobjdump", cuda_home)

    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "kernels.o"
        ptxas = compile_file(nvcc, source, args.arch, args.defines, obj)
        regions = sass_regions(cuobjdump, obj)
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


if __name__ == "__main__":
    main()
