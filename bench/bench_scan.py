"""Speed and memory of the coupled selective scan operator against the plain-PyTorch reference
loop (coupled_mamba_ext.reference.coupled_scan_ref), side by side in one run.

    python bench/bench_scan.py --device cpu                 # ~10 minutes on 2 cores
    python bench/bench_scan.py --device cpu --cases short   # the L = 50 shape alone
    python bench/bench_scan.py --device cuda --json out.json

Every case runs the operator and the reference on the same inputs (all optional arguments:
D, z, delta_bias, softplus; coupling 1/M), forward alone and forward + backward (gradients of
every input), and reports the median time and the ratio reference / operator.

CPU: shapes (M=3, batch 32, dim 256, L=50, N=64) and (M=3, batch 4, dim 256, L=2000, N=16).
    Memory is the extra peak resident memory of one call above the memory held with the
    inputs allocated, measured in a fresh subprocess per measurement so that no other
    measurement's heap hides or inflates it (torch has no CPU allocator statistics, and its
    profiler counts requests, not what the process holds). In that subprocess glibc's mmap
    threshold is pinned (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the system and
    the resident size follows the live tensors; a warm-up call on 4 steps runs first (thread
    pools, lazy initialisation), then the peak is reset through /proc/self/clear_refs and
    read from VmHWM. Then the scaling: the operator's forward+backward extra memory at L and
    2L, N and 2N (docs/contract.md: it grows with M·batch·dim·L, not with N·L), with the reference's
    beside it (the reference keeps (M, batch, dim, N) states per step: its memory grows with
    N·L).

CUDA: the card's copy bandwidth, then shapes (a) M=3, batch 1024, dim 256, L=50, N=64,
    (b) M=3, batch 16, dim 256, L=1000, N=64, (c) M=2, batch 8, dim 1536, L=4096, N=16 in bf16
    and fp32: times from CUDA events (median after warm-up); the memory-traffic floor (kernels.md:
    u, delta, z read and y written, 4·M·batch·dim·L elements, plus B, C, 2·M·batch·N·L,
    over the measured bandwidth) and the exp floor (M·batch·dim·L·N exponentials at 4e12/s);
    peak memory (torch.cuda.max_memory_allocated above the memory held before the call); the
    largest single allocation during forward+backward (from the caching allocator's memory
    history) against batch·dim·N·L elements; mamba_ssm's selective_scan_cuda on the same
    work (M uncoupled modalities as a batch of M·batch) when it imports.

Times on a shared CPU: the operator and the reference alternate call by call, and each row
records the load average. The reference is hundreds of small multi-threaded torch ops per
call; when other jobs take the cores, each op waits for a descheduled OpenMP thread and the
reference slows far more than the operator (seen here: 1 s becoming 50 s). Compare figures
taken at a low load, or with --threads 1.

--json PATH writes every number. The summary table is printed last. --no-reference times
the operator alone (CUDA; for comparing builds of the kernels quickly). On CUDA each case
also times the operator with each thread mapping forced (COUPLED_MAMBA_CUDA_KERNELS,
docs/kernels.md) in the same run: columns "state ms" and "time ms" beside the default's
("op ms"), and forward+backward under torch.use_deterministic_algorithms(True) ("det ms",
"det peak": the backward's per-block slots, docs/kernels.md "Determinism").
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

try:
    import coupled_mamba_ext
except ImportError:  # a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import coupled_mamba_ext
from coupled_mamba_ext import coupled_selective_scan
from coupled_mamba_ext.reference import coupled_scan_ref
from coupled_mamba_ext.train import deterministic_algorithms

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_SHAPES = {"short": (3, 32, 256, 50, 64), "long": (3, 4, 256, 2000, 16)}
CPU_SCALING_BASE = (3, 4, 256, 500, 16)
CUDA_SHAPES = {"a": (3, 1024, 256, 50, 64), "b": (3, 16, 256, 1000, 64),
               "c": (2, 8, 1536, 4096, 16)}
EXP_RATE = 4e12  # exponentials per second of an H100's special-function units
MiB = 2 ** 20


def shape_name(shape):
    return "M%d b%d d%d L%d N%d" % shape


def elements(shape):
    """Elements of u-sized (M, batch, dim, L) and B-sized (M, batch, N, L) tensors."""
    M, batch, dim, L, N = shape
    return M * batch * dim * L, M * batch * N * L


# ---------------------------------------------------------------------------- inputs
def make_inputs(shape, dtype, device, seed=0):
    """Inputs of one call in Mamba's usual ranges: Δ = softplus(δ + β) ≈ 0.3, A < 0."""
    M, batch, dim, L, N = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*size, generator=g, device=device, dtype=torch.float32)
                * scale + shift).to(dt)

    return dict(
        u=randn(M, batch, dim, L), delta=randn(M, batch, dim, L, scale=0.5, shift=-1.0),
        A=-torch.exp(randn(M, dim, N, scale=0.5, dt=torch.float32)),
        B=randn(M, batch, N, L), C=randn(M, batch, N, L),
        D=randn(M, dim, dt=torch.float32), z=randn(M, batch, dim, L),
        delta_bias=randn(M, dim, scale=0.25, dt=torch.float32), delta_softplus=True,
        coupling=torch.full((M,), 1.0 / M, device=device))


def leaves(inputs):
    return {k: v.detach().requires_grad_(True) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


SCANS = {"op": coupled_selective_scan, "ref": coupled_scan_ref}


def forward(scan, inputs):
    return scan(**inputs)


def forward_backward(scan, inputs, dy):
    """Forward, then the gradients of Σ y·dy with respect to every tensor input."""
    y = scan(**inputs)
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    return torch.autograd.grad(y, tensors, dy.to(y.dtype))


def make_call(kind, mode, shape, dtype, device):
    """A zero-argument function running one measured call, with its inputs made once."""
    scan = SCANS[kind]
    inputs = make_inputs(shape, dtype, device)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return forward(scan, inputs)
        return call
    args = leaves(inputs)
    dy = torch.randn(args["u"].shape, device=device).to(dtype)
    return lambda: forward_backward(scan, args, dy)


# ---------------------------------------------------------------------------- timing
def time_cpu(calls, warmup, repeats, warmup_seconds=2.0):
    """Median seconds of each of ``calls`` (name -> function), run round-robin: on a shared
    machine a change of load then hits the operator and the reference alike. Warm-up: at
    least ``warmup[name]`` calls each, and the calls with a warm-up go on round-robin until
    ``warmup_seconds`` have passed: on the development VM a core that has been idle runs
    the same code up to 1.7x slower for its first second or so of work (measured: one
    thread, L = 50 forward 97-104 ms for the first calls after a pause, 57-62 ms after)."""
    start = time.perf_counter()
    for name, call in calls.items():
        for _ in range(warmup[name]):
            call()
    while time.perf_counter() - start < warmup_seconds:
        for name, call in calls.items():
            if warmup[name]:
                call()
    times = {name: [] for name in calls}
    while any(len(times[name]) < repeats[name] for name in calls):
        for name, call in calls.items():
            if len(times[name]) < repeats[name]:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_cuda(call, warmup, repeats):
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------- CPU memory
def _read_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def measure_cpu_memory_here(kind, mode, shape, dtype_name):
    """Extra peak resident memory of one call above the memory held with its inputs; run in
    a fresh subprocess (see the module docstring)."""
    call = make_call(kind, mode, shape, DTYPES[dtype_name], "cpu")
    try:
        clear_refs = open("/proc/self/clear_refs", "w")
    except OSError:
        clear_refs = None
    if clear_refs is None:
        # No way to reset the peak: measure the first call against ru_maxrss (kB on Linux),
        # which then also counts one-time initialisation (thread pools and the like).
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = call()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"extra_bytes": peak - base, "method": "ru_maxrss, first call"}
    # Warm-up on a few steps of the same case: thread pools and lazy initialisation are not
    # the call's memory (a full-length warm-up of the reference loop would take minutes).
    M, batch, dim, L, N = shape
    make_call(kind, mode, (M, batch, dim, min(L, 4), N), DTYPES[dtype_name], "cpu")()
    with clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident size, to the current size
    base = _read_status("VmRSS")
    result = call()
    peak = _read_status("VmHWM")
    del result
    return {"extra_bytes": peak - base, "method": "VmHWM after clear_refs"}


def measure_cpu_memory(kind, mode, shape, dtype_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    spec = json.dumps({"kind": kind, "mode": mode, "shape": shape, "dtype": dtype_name})
    command = [sys.executable, os.path.abspath(__file__), "--measure-memory", spec,
               "--threads", str(torch.get_num_threads())]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cpu(args, report):
    dtype = DTYPES[args.dtype or "float32"]
    dtype_name = args.dtype or "float32"
    print(f"CPU, {torch.get_num_threads()} threads, {dtype_name}", flush=True)
    for name in args.cases or CPU_SHAPES:
        shape = CPU_SHAPES[name]
        long = shape[3] >= 1000
        for mode in ("fwd", "fwdbwd"):
            row = {"shape": shape, "dtype": dtype_name, "mode": mode,
                   "load_avg_1min_before": os.getloadavg()[0]}
            # The reference loop at L = 2000 takes most of a minute per call on 2 cores:
            # one call, no warm-up (the short shape warmed the same code up). The op's calls
            # are cheap: more of them, so that one slow call (a core slowed by another job or
            # by the VM) does not move its median.
            calls = {kind: make_call(kind, mode, shape, dtype, "cpu") for kind in ("op", "ref")}
            seconds = time_cpu(calls, warmup={"op": 2, "ref": 0 if long else 1},
                               repeats={"op": 7 if long else 15, "ref": 1 if long else 3})
            del calls
            for kind in ("op", "ref"):
                row[kind + "_s"] = seconds[kind]
                mem = measure_cpu_memory(kind, mode, shape, dtype_name)
                row[kind + "_extra_bytes"] = mem["extra_bytes"]
                row["memory_method"] = mem["method"]
            row["speedup"] = row["ref_s"] / row["op_s"]
            report["cases"].append(row)
            print(f"  {shape_name(shape)} {mode:6s}: op {row['op_s'] * 1e3:9.1f} ms, "
                  f"reference {row['ref_s'] * 1e3:9.1f} ms, x{row['speedup']:.1f}; extra memory "
                  f"op {_mib(row['op_extra_bytes'])}, reference {_mib(row['ref_extra_bytes'])}",
                  flush=True)

    if args.cases:  # a quick run of chosen shapes: no scaling study
        return
    # How forward+backward extra memory scales.
    M, batch, dim, L, N = CPU_SCALING_BASE
    variants = {"base": CPU_SCALING_BASE, "2L": (M, batch, dim, 2 * L, N),
                "2N": (M, batch, dim, L, 2 * N)}
    scaling = {"base_shape": CPU_SCALING_BASE}
    for kind in ("op", "ref"):
        extra = {k: measure_cpu_memory(kind, "fwdbwd", s, dtype_name)["extra_bytes"]
                 for k, s in variants.items()}
        scaling[kind] = {"extra_bytes": extra,
                         "ratio_2L": _ratio(extra["2L"], extra["base"]),
                         "ratio_2N": _ratio(extra["2N"], extra["base"])}
    report["scaling"] = scaling
    print(f"  fwd+bwd extra memory from {shape_name(CPU_SCALING_BASE)}: "
          f"op L->2L x{_fmt(scaling['op']['ratio_2L'])}, N->2N x{_fmt(scaling['op']['ratio_2N'])}; "
          f"reference L->2L x{_fmt(scaling['ref']['ratio_2L'])}, "
          f"N->2N x{_fmt(scaling['ref']['ratio_2N'])}", flush=True)


# ---------------------------------------------------------------------------- CUDA
def copy_bandwidth():
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 10)."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_cuda(lambda: dst.copy_(src), warmup=3, repeats=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 ** 30 / seconds


def cuda_peak_extra(call):
    """Peak allocated memory during one call above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak


def largest_allocation(call):
    """The largest block the caching allocator handed out during one call, from its memory
    history (every allocation, not only those live at the peak). None where the history is
    unavailable (a private API: its signature has changed across torch versions)."""
    def alloc_events():
        snapshot = torch.cuda.memory._snapshot()
        return [e for trace in snapshot.get("device_traces", []) for e in trace]
    try:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    except (AttributeError, RuntimeError, TypeError):
        return None
    try:
        torch.cuda.synchronize()
        before = len(alloc_events())  # history may hold earlier calls' events
        result = call()
        torch.cuda.synchronize()
        events = alloc_events()[before:]
        del result
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return max((e["size"] for e in events if e.get("action") == "alloc"), default=0)


def reference_bytes_estimate(shape, mode):
    """Memory the reference loop needs on the GPU: a few (M, batch, dim, N) fp32 tensors at a
    time, plus, for backward, about two and a half of them kept per step (the decays, the
    modality states, the coupled state)."""
    M, batch, dim, L, N = shape
    per_state = 4 * M * batch * dim * N
    return per_state * (6 + (2.5 * L if mode == "fwdbwd" else 0))


def mamba_ssm_times(shape, dtype):
    """mamba_ssm's selective_scan_cuda on M uncoupled modalities as one batch of M·batch (one
    A shared by all: the kernel takes one). None when it does not import."""
    try:
        import selective_scan_cuda
    except ImportError:
        return None
    M, batch, dim, L, N = shape
    x = make_inputs(shape, dtype, "cuda")
    u, delta, z = (x[k].reshape(M * batch, dim, L) for k in ("u", "delta", "z"))
    B, C = (x[k].reshape(M * batch, N, L) for k in ("B", "C"))
    A, D, bias = x["A"][0].contiguous(), x["D"][0].contiguous(), x["delta_bias"][0].contiguous()

    def fwd():
        return selective_scan_cuda.fwd(u, delta, A, B, C, D, z, bias, True)

    def fwd_bwd():
        out, state, *rest = fwd()
        dout = torch.ones_like(u)
        return selective_scan_cuda.bwd(u, delta, A, B, C, D, z, bias, dout, state, out, None,
                                       True, False)
    try:
        return {"fwd_s": time_cuda(fwd, 3, 10), "fwdbwd_s": time_cuda(fwd_bwd, 3, 10)}
    except (RuntimeError, TypeError) as e:  # its signature changed across versions
        return {"error": str(e).splitlines()[0]}


def with_kernels(mapping, fn):
    """fn() with the CUDA kernels of one thread mapping (COUPLED_MAMBA_CUDA_KERNELS, read by
    the extension at every call)."""
    before = os.environ.get("COUPLED_MAMBA_CUDA_KERNELS")
    os.environ["COUPLED_MAMBA_CUDA_KERNELS"] = mapping
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["COUPLED_MAMBA_CUDA_KERNELS"]
        else:
            os.environ["COUPLED_MAMBA_CUDA_KERNELS"] = before


def deterministic(fn):
    """fn() under torch.use_deterministic_algorithms(True) (the backward's sums over blocks
    through per-block slots, docs/kernels.md "Determinism"); None where that raises."""
    try:
        with deterministic_algorithms():
            return fn()
    except RuntimeError as error:
        print(f"  deterministic: {str(error).splitlines()[0]}", flush=True)
        return None


def run_cuda(args, report):
    dtype_names = [args.dtype] if args.dtype else ["bfloat16", "float32"]
    props = torch.cuda.get_device_properties(0)
    report["meta"]["gpu"] = props.name
    bandwidth = copy_bandwidth()
    report["copy_bandwidth_Bps"] = bandwidth
    print(f"{props.name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)", flush=True)
    for label, shape in CUDA_SHAPES.items():
        M, batch, dim, L, N = shape
        x_elems, bc_elems = elements(shape)
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            size = torch.tensor([], dtype=dtype).element_size()
            floor_fwd = (4 * x_elems + 2 * bc_elems) * size / bandwidth
            # Backward reads u, delta, z, dy, B, C and writes du, ddelta, dz, dB, dC at least.
            floor_fwdbwd = floor_fwd + (7 * x_elems + 4 * bc_elems) * size / bandwidth
            exp_floor = M * batch * dim * L * N / EXP_RATE
            for mode in ("fwd", "fwdbwd"):
                row = {"case": label, "shape": shape, "dtype": dtype_name, "mode": mode,
                       "floor_s": floor_fwd if mode == "fwd" else floor_fwdbwd,
                       "exp_floor_fwd_s": exp_floor}
                call = make_call("op", mode, shape, dtype, "cuda")
                row["op_s"] = time_cuda(call, warmup=3, repeats=20)
                row["op_peak_extra_bytes"] = cuda_peak_extra(call)
                # The same call with each thread mapping forced (docs/kernels.md); op_s is the
                # default (state lanes, the backward falling back to time lanes where the
                # state-lanes one does not fit).
                for mapping in ("state_lanes", "time_lanes"):
                    row[f"{mapping}_s"] = with_kernels(
                        mapping, lambda: time_cuda(call, warmup=3, repeats=20))
                if mode == "fwdbwd":
                    timed = deterministic(lambda: (time_cuda(call, warmup=3, repeats=20),
                                                   cuda_peak_extra(call)))
                    row["deterministic_s"], row["deterministic_peak_extra_bytes"] = \
                        timed if timed else (None, None)
                if mode == "fwdbwd" and not args.no_reference:
                    threshold = batch * dim * N * L * 2  # elements, at 2 bytes each at least
                    largest = largest_allocation(call)
                    if largest is None:  # the peak bounds every single allocation
                        largest = row["op_peak_extra_bytes"]
                    row["largest_alloc_bytes"] = largest
                    row["alloc_ge_batch_dim_N_L"] = largest >= threshold
                del call
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info()
                ref_need = reference_bytes_estimate(shape, mode)
                if args.no_reference:
                    row["ref_skipped"] = "not timed (--no-reference)"
                elif ref_need > 0.8 * free:
                    row["ref_skipped"] = f"skipped: would need {ref_need / 2 ** 30:.1f} GiB"
                else:
                    try:
                        call = make_call("ref", mode, shape, dtype, "cuda")
                        row["ref_s"] = time_cuda(call, warmup=1, repeats=3 if L <= 1000 else 2)
                        row["ref_peak_extra_bytes"] = cuda_peak_extra(call)
                        row["speedup"] = row["ref_s"] / row["op_s"]
                    except torch.cuda.OutOfMemoryError:
                        row["ref_skipped"] = "skipped: out of memory"
                    call = None
                    torch.cuda.empty_cache()
                report["cases"].append(row)
                print(f"  ({label}) {shape_name(shape)} {dtype_name:8s} {mode:6s}: "
                      f"op {row['op_s'] * 1e3:8.3f} ms (state lanes "
                      f"{row['state_lanes_s'] * 1e3:.3f}, time lanes "
                      f"{row['time_lanes_s'] * 1e3:.3f} ms"
                      + (f", deterministic {_ms(row['deterministic_s'])} peak "
                         f"+{_mib(row['deterministic_peak_extra_bytes'])}" if mode == "fwdbwd" else "")
                      + f") = {row['op_s'] / row['floor_s']:.2f}x "
                      f"traffic floor {row['floor_s'] * 1e3:.3f} ms (exp floor, fwd: "
                      f"{exp_floor * 1e3:.3f} ms); reference "
                      f"{row.get('ref_skipped') or _ms(row.get('ref_s'))} "
                      f"x{_fmt(row.get('speedup'))}; "
                      f"op peak +{_mib(row['op_peak_extra_bytes'])}", flush=True)
            mamba = mamba_ssm_times(shape, dtype)
            report["mamba_ssm"].append({"case": label, "dtype": dtype_name,
                                        "result": mamba if mamba else "not importable"})


# ---------------------------------------------------------------------------- output
def _mib(b):
    return "n/a" if b is None else f"{b / MiB:.1f} MiB"


def _ms(s):
    return "n/a" if s is None else f"{s * 1e3:.2f} ms"


def _fmt(x):
    return "n/a" if x is None else f"{x:.2f}"


def _ratio(a, b):
    return None if a is None or not b else a / b


def print_table(report):
    print()
    print(f"coupled_mamba_ext {report['meta']['version']}, torch {torch.__version__}, "
          f"{report['meta'].get('gpu') or report['meta']['cpu']}, load average "
          f"{report['meta']['load_avg_start']} -> {report['meta']['load_avg_end']}")
    cuda = report["device"] == "cuda"
    head = f"{'shape':24s} {'dtype':8s} {'mode':6s} {'op ms':>10s} {'ref ms':>10s} {'speed-up':>9s}"
    head += (f" {'op/floor':>8s} {'op peak':>12s} {'state ms':>9s} {'time ms':>9s}"
             f" {'det ms':>9s} {'det peak':>12s}" if cuda
             else f" {'op extra':>12s} {'ref extra':>12s} {'load':>5s}")
    print(head)
    for row in report["cases"]:
        line = (f"{shape_name(tuple(row['shape'])):24s} {row['dtype']:8s} {row['mode']:6s} "
                f"{row['op_s'] * 1e3:10.3f} {_ms(row.get('ref_s')).replace(' ms', ''):>10s} "
                f"{_fmt(row.get('speedup')):>9s}")
        if cuda:
            line += (f" {row['op_s'] / row['floor_s']:8.2f} {_mib(row['op_peak_extra_bytes']):>12s}"
                     f" {row['state_lanes_s'] * 1e3:9.3f} {row['time_lanes_s'] * 1e3:9.3f}"
                     f" {_ms(row.get('deterministic_s')).replace(' ms', ''):>9s}"
                     f" {_mib(row.get('deterministic_peak_extra_bytes')):>12s}")
        else:
            line += (f" {_mib(row['op_extra_bytes']):>12s} {_mib(row['ref_extra_bytes']):>12s}"
                     f" {row['load_avg_1min_before']:5.1f}")
        print(line)
    if cuda:
        print(f"copy bandwidth {report['copy_bandwidth_Bps'] / 1e9:.0f} GB/s; floor = bytes of "
              "u, delta, z, y (+ B, C) over it; exp floor (fwd) per case in the JSON")
        checked = [r for r in report["cases"] if "alloc_ge_batch_dim_N_L" in r]
        big = [r for r in checked if r["alloc_ge_batch_dim_N_L"]]
        print("allocation of >= batch*dim*N*L elements during fwd+bwd: "
              + ("not checked" if not checked else
                 "YES in " + ", ".join(f"({r['case']}) {r['dtype']}" for r in big) if big
                 else "none"))
        for m in report["mamba_ssm"]:
            print(f"mamba_ssm selective_scan_cuda ({m['case']}) {m['dtype']}: {m['result']}")
    elif "scaling" in report:
        s = report["scaling"]
        print(f"fwd+bwd extra memory ratios from {shape_name(tuple(s['base_shape']))}: "
              f"op L->2L {_fmt(s['op']['ratio_2L'])}, N->2N {_fmt(s['op']['ratio_2N'])}; "
              f"reference L->2L {_fmt(s['ref']['ratio_2L'])}, N->2N {_fmt(s['ref']['ratio_2N'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="input dtype (default: float32 on CPU, bfloat16 and float32 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads; also in the memory "
                        "subprocesses); default: torch's")
    parser.add_argument("--cases", nargs="+", choices=list(CPU_SHAPES), default=None,
                        help="CPU: time only these shapes (short: M=3 batch 32 dim 256 L=50 "
                        "N=64; long: M=3 batch 4 dim 256 L=2000 N=16), without the memory "
                        "scaling study; default: every shape and the study")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--no-reference", action="store_true",
                        help="CUDA: time the operator only (no reference loop, no memory history)")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:  # a memory measurement in this fresh process
        spec = json.loads(args.measure_memory)
        print(json.dumps(measure_cpu_memory_here(spec["kind"], spec["mode"],
                                                 tuple(spec["shape"]), spec["dtype"])))
        return
    if args.cases and args.device != "cpu":
        parser.error("--cases chooses CPU shapes; use it with --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_scan: --device cuda but no CUDA device is visible")
    if args.device == "cuda" and not coupled_mamba_ext.build_info()["cuda"]:
        sys.exit("bench_scan: the extension was built without CUDA kernels")

    report = {"device": args.device, "cases": [], "mamba_ssm": [],
              "meta": {"version": coupled_mamba_ext.__version__, "torch": torch.__version__,
                       "build_info": coupled_mamba_ext.build_info(),
                       "cpu": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "load_avg_start": "%.2f" % os.getloadavg()[0]}}
    (run_cuda if args.device == "cuda" else run_cpu)(args, report)
    report["meta"]["load_avg_end"] = "%.2f" % os.getloadavg()[0]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print_table(report)


if __name__ == "__main__":
    main()
