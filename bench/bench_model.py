"""End-to-end efficiency of Coupled Mamba against a Transformer fusion of the same width and
depth (the paper's §4.4, Figures 3 and 4): time and peak memory of inference and of a
training step (forward + backward) over a range of sequence lengths, measured side by side.

    python bench/bench_model.py --device cpu                      # ~4 minutes on 2 cores
    python bench/bench_model.py --device cuda --json out.json --out out/

Models (``--models``; ratios are taken against "coupled"):
    coupled           CoupledMamba(fusion="coupled"), learned coupling.
    transformer       CoupledMamba(fusion="transformer"): M * L tokens through
                      nn.TransformerEncoder, attention as PyTorch chooses it. On CUDA that
                      is a fused kernel (flash / memory-efficient) whose memory grows
                      linearly with the token count; on the CPU the model's inference fast
                      path and its training step (attention dropout) materialise the
                      attention matrix.
    transformer_math  the same model with scaled_dot_product_attention forced to the math
                      backend, which materialises the (M*L)^2 attention matrix as a
                      textbook implementation does.
    transformer_masked  the "transformer" model called with every true length given (all
                      equal to L): attention then takes an all-valid key padding mask,
                      which keeps it off PyTorch's fast paths. The model once built that
                      mask even without lengths, so older "transformer" figures were
                      measured this way (reports/). Its time also includes the model's
                      check of the lengths, which the old behaviour did not have (small
                      against attention at the lengths where the mask matters).

Memory is the peak over the call minus the memory held just before it (model weights and,
for the training step, no gradients). The inputs are created inside the measured window,
so they are counted; they are the same for every model.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().
  CPU:  the process's peak resident set size. Each (model, mode, length) runs in a fresh
        subprocess, so no allocator state or heap left over from another measurement
        inflates or hides it; the peak is reset with /proc/self/clear_refs (Linux) after a
        short warm-up and read from VmHWM. Where clear_refs is not writable the subprocess's
        ru_maxrss is used instead (it then includes import-time peaks; the JSON says so).
        torch.profiler's memory profile was not used: it counts allocator requests, not
        the memory the process actually holds, and slows the run.

Time is the median of --repeats calls after --warmup calls per model and length, the
models alternating call by call so that load drifts on a shared machine hit both alike.
"""
import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

try:
    from coupled_mamba_ext.models import CoupledMamba
except ImportError:  # run from a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from coupled_mamba_ext.models import CoupledMamba

MODELS = ("coupled", "transformer", "transformer_math", "transformer_masked")
MODES = ("inference", "train")
PAPER_L = 500
PAPER_TIME_SAVING = 49.0     # % less inference time than a Transformer at L = 500 (§4.4)
PAPER_MEMORY_SAVING = 83.7   # % less GPU memory than a Transformer at L = 500 (Figure 3)
DEFAULTS = {  # device -> (batch, lengths, models, warmup, repeats)
    "cpu": (4, [50, 100, 200, 500], ["coupled", "transformer", "transformer_masked"], 1, 3),
    "cuda": (32, [50, 100, 200, 500, 1000, 2000], list(MODELS), 3, 10),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, help="default: 4 on CPU, 32 on CUDA")
    p.add_argument("--lengths", type=int, nargs="+",
                   help="default: 50 100 200 500 on CPU, 50 100 200 500 1000 2000 on CUDA")
    p.add_argument("--models", nargs="+", choices=MODELS,
                   help="coupled first, then the baselines; default: coupled transformer on "
                   "CPU, all three on CUDA")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--input-dims", type=int, nargs="+", default=[768, 74, 35],
                   help="feature size per modality (default: MOSEI text, audio, vision)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=3)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=4, help="attention heads of the Transformer")
    p.add_argument("--warmup", type=int, help="default: 1 on CPU, 3 on CUDA")
    p.add_argument("--repeats", type=int, help="default: 3 on CPU, 10 on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: "
                   "torch's choice")
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="folder for the PNG plots (default: bench/results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch, lengths, models, warmup, repeats = DEFAULTS[args.device]
    args.batch = args.batch or batch
    args.models = args.models or models
    args.lengths = sorted(args.lengths or lengths)
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = args.repeats or repeats
    if args.models[0] != "coupled" or len(args.models) < 2:
        p.error("--models: expected 'coupled' first and at least one baseline")
    return args


# ------------------------------------------------------------------------------ workloads
def build_model(name: str, args: argparse.Namespace, device: torch.device) -> CoupledMamba:
    torch.manual_seed(args.seed)
    fusion = "coupled" if name == "coupled" else "transformer"
    return CoupledMamba(args.input_dims, d_model=args.d_model, n_layers=args.n_layers,
                        d_state=args.d_state, fusion=fusion, n_heads=args.n_heads).to(device)


def make_inputs(args: argparse.Namespace, L: int, device: torch.device) -> List[torch.Tensor]:
    """One (batch, L, dim) tensor per modality, drawn on the device (the same for every
    model at a given length)."""
    generator = torch.Generator(device).manual_seed(args.seed + L)
    return [torch.randn(args.batch, L, dim, generator=generator, device=device)
            for dim in args.input_dims]


def attention_backend(name: str):
    """Context forcing the math attention backend for "transformer_math"."""
    from contextlib import nullcontext
    if name != "transformer_math":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


def run_once(model: CoupledMamba, name: str, mode: str, xs: List[torch.Tensor]) -> None:
    """One inference call (eval, inference_mode) or one training step (train mode, forward,
    L1 loss, backward; gradients are dropped afterwards, no optimizer)."""
    lengths = None
    if name == "transformer_masked":  # every length given: an all-valid padding mask
        lengths = [torch.full((x.shape[0],), x.shape[1], device=x.device) for x in xs]
    with attention_backend(name):
        if mode == "inference":
            model.eval()
            with torch.inference_mode():
                model(xs, lengths)
        else:
            model.train()
            loss = model(xs, lengths).abs().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------ timing
class Timer:
    """Seconds of one call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def failure(name: str, error: Exception, device: torch.device) -> dict:
    """Record a model that could not run (out of memory, or e.g. an operator without a
    kernel for this device) and free what it held; the other models go on."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if is_oom(error):
        return {"oom": True}
    message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    print(f"  {name} failed: {message}", file=sys.stderr, flush=True)
    return {"error": message}


def time_length(models: Dict[str, CoupledMamba], mode: str, L: int, args, device,
                timer: Timer) -> Dict[str, dict]:
    """Median time of every model at one length; the models alternate call by call."""
    xs = make_inputs(args, L, device)
    samples: Dict[str, List[float]] = {name: [] for name in models}
    failed: Dict[str, dict] = {}
    for _ in range(args.warmup + args.repeats):
        for name, model in models.items():
            if name in failed:
                continue
            try:
                samples[name].append(timer(lambda: run_once(model, name, mode, xs)))
            except Exception as error:  # noqa: BLE001  (recorded, the other models go on)
                model.zero_grad(set_to_none=True)
                failed[name] = failure(name, error, device)
    result = {}
    for name, times in samples.items():
        if name in failed:
            result[name] = {"time_s": None, **failed[name]}
        else:
            measured = times[args.warmup:]
            result[name] = {"time_s": statistics.median(measured), "min_s": min(measured),
                            "times_s": measured}
    return result


# ------------------------------------------------------------------------------ memory
def cuda_peak_memory(model: CoupledMamba, name: str, mode: str, L: int, args,
                     device) -> dict:
    """Peak CUDA memory of one call above what was allocated before it (the weights)."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run_once(model, name, mode, make_inputs(args, L, device))
    except Exception as error:  # noqa: BLE001  (recorded, the other models go on)
        model.zero_grad(set_to_none=True)
        return {"peak_bytes": None, **failure(name, error, device)}
    torch.cuda.synchronize()
    return {"peak_bytes": torch.cuda.max_memory_allocated(device) - before}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the baseline RSS is live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_memory_child(spec: str) -> None:
    """Subprocess entry: measure the peak RSS of one (model, mode, length); print JSON."""
    import gc
    import resource
    config = json.loads(spec)
    args = argparse.Namespace(**config["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    name, mode, L = config["model"], config["mode"], config["L"]
    device = torch.device("cpu")
    model = build_model(name, args, device)
    # Warm-up at a short length: thread pools, kernels and caches are set up once per
    # process; they are not part of what a length costs.
    run_once(model, name, mode, make_inputs(args, min(L, 16), device))
    gc.collect()
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS
        hwm_reset = True
        before_kib = _proc_status_kib("VmRSS")
    except OSError:
        hwm_reset = False
        before_kib = _proc_status_kib("VmRSS")
    run_once(model, name, mode, make_inputs(args, L, device))
    peak_kib = (_proc_status_kib("VmHWM") if hwm_reset
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"peak_bytes": (peak_kib - before_kib) * 1024,
                      "hwm_reset": hwm_reset}))


def cpu_peak_memory(name: str, mode: str, L: int, args) -> dict:
    keys = ("batch", "input_dims", "d_model", "n_layers", "d_state", "n_heads", "seed",
            "threads")
    spec = json.dumps({"model": name, "mode": mode, "L": L,
                       "args": {k: getattr(args, k) for k in keys}})
    completed = subprocess.run([sys.executable, os.path.abspath(__file__),
                                "--_memory-child", spec],
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or ["no output"]
        oom = "out of memory" in completed.stderr.lower() or completed.returncode == -9
        print(f"  memory subprocess for {name} {mode} L={L} failed: {lines[-1]}",
              file=sys.stderr, flush=True)
        return {"peak_bytes": None, **({"oom": True} if oom else {"error": lines[-1]})}
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ reporting
def ratios(results: dict, mode: str, L: int, baseline: str) -> dict:
    """Speed-up and savings of coupled over `baseline` at one (mode, length)."""
    ours, theirs = results[mode][str(L)]["coupled"], results[mode][str(L)][baseline]
    out = {}
    if ours.get("time_s") and theirs.get("time_s"):
        out["speedup"] = theirs["time_s"] / ours["time_s"]
        out["time_saving_pct"] = 100.0 * (1.0 - ours["time_s"] / theirs["time_s"])
    if ours.get("peak_bytes") and theirs.get("peak_bytes"):
        out["memory_saving_pct"] = 100.0 * (1.0 - ours["peak_bytes"] / theirs["peak_bytes"])
    return out


def cell(entry: dict, key: str, scale: float, spec: str) -> str:
    """A measured value for the table, or why there is none."""
    if entry.get(key) is not None:
        return format(entry[key] * scale, spec)
    return "OOM" if entry.get("oom") else "error" if entry.get("error") else "-"


def print_table(results: dict, args) -> None:
    """One table per mode: time and memory of every model, and coupled's ratios against each
    baseline (speed-up = baseline time / coupled time; savings = 1 - coupled / baseline)."""
    for mode in args.modes:
        columns = ["L", "coupled ms"]
        for b in args.models[1:]:
            columns += [f"{b} ms", "speed-up", "time -%"]
        columns.append("coupled MiB")
        for b in args.models[1:]:
            columns += [f"{b} MiB", "mem -%"]
        rows = []
        for L in args.lengths:
            row = results[mode][str(L)]
            cells = [str(L), cell(row["coupled"], "time_s", 1e3, ".1f")]
            for b in args.models[1:]:
                r = ratios(results, mode, L, b)
                cells += [cell(row[b], "time_s", 1e3, ".1f"), cell(r, "speedup", 1, ".2f"),
                          cell(r, "time_saving_pct", 1, ".1f")]
            cells.append(cell(row["coupled"], "peak_bytes", 2**-20, ".1f"))
            for b in args.models[1:]:
                r = ratios(results, mode, L, b)
                cells += [cell(row[b], "peak_bytes", 2**-20, ".1f"),
                          cell(r, "memory_saving_pct", 1, ".1f")]
            rows.append(cells)
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(f"\n{mode}, batch {args.batch}: median time per call (ms); peak memory above the "
              f"weights (MiB); coupled's speed-up and savings against each baseline")
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for cells in rows:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    if "inference" in args.modes and PAPER_L in args.lengths:
        print()
        for baseline in args.models[1:]:
            r = ratios(results, "inference", PAPER_L, baseline)
            time_part = (f"{r['time_saving_pct']:.1f}% less time ({r['speedup']:.2f}x)"
                         if "time_saving_pct" in r else "time n/a")
            mem_part = (f"{r['memory_saving_pct']:.1f}% less memory"
                        if "memory_saving_pct" in r else "memory n/a")
            print(f"L={PAPER_L} inference vs {baseline}: ours {time_part}, {mem_part}; paper "
                  f"(V100, its own Transformer): {PAPER_TIME_SAVING:.0f}% faster, "
                  f"{PAPER_MEMORY_SAVING}% less GPU memory")


def plot(results: dict, args, device_label: str) -> List[str]:
    """Figure 3 (memory vs L) and Figure 4 (time vs L) of the paper, one panel per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    os.makedirs(args.out, exist_ok=True)
    styles = {"coupled": ("Coupled Mamba", "o-"), "transformer": ("Transformer", "s--"),
              "transformer_math": ("Transformer (math attention)", "^:"),
              "transformer_masked": ("Transformer, all-valid padding mask", "v-.")}
    figures = [("memory", "peak_bytes", 2**20, "peak memory above weights (MiB)",
                "fig3_memory_vs_length.png"),
               ("time", "time_s", 1e-3, "time per call (ms)", "fig4_time_vs_length.png")]
    paths = []
    for title, key, scale, ylabel, filename in figures:
        if key == "peak_bytes" and args.no_memory:
            continue
        fig, axes = plt.subplots(1, len(args.modes), figsize=(5.2 * len(args.modes), 4),
                                 squeeze=False)
        for ax, mode in zip(axes[0], args.modes):
            for name in args.models:
                points = [(L, results[mode][str(L)][name].get(key)) for L in args.lengths]
                points = [(L, v / scale) for L, v in points if v is not None]
                if points:
                    label, style = styles[name]
                    ax.plot(*zip(*points), style, label=label)
            step = "inference" if mode == "inference" else "training step (fwd+bwd)"
            ax.set_title(f"{step}, batch {args.batch}")
            ax.set_xlabel("sequence length L (per modality)")
            ax.set_ylabel(ylabel)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(args.lengths)
            ax.set_xticklabels([str(L) for L in args.lengths])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{title} vs sequence length — {device_label}")
        fig.tight_layout()
        path = os.path.join(args.out, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    else:
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                names = [l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name")]
            info["device_name"] = f"{len(names)} x {names[0]}" if names else platform.processor()
        except OSError:
            info["device_name"] = platform.processor()
    return info


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        cpu_memory_child(args.memory_child)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(device)
    info["load_average_start"] = load_average()
    print(f"device: {info['device_name']}, torch {info['torch']}, {info['threads']} threads, "
          f"load average {info['load_average_start']}")
    models = {name: build_model(name, args, device) for name in args.models}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print("parameters: " + ", ".join(f"{n} {c:,}" for n, c in params.items()))
    timer = Timer(device)
    results: Dict[str, Dict[str, Dict[str, dict]]] = {mode: {} for mode in args.modes}
    start = time.perf_counter()
    for mode in args.modes:
        for L in args.lengths:
            row = time_length(models, mode, L, args, device, timer)
            if not args.no_memory:
                for name, model in models.items():
                    memory = (cuda_peak_memory(model, name, mode, L, args, device)
                              if device.type == "cuda" else cpu_peak_memory(name, mode, L, args))
                    row[name].update(memory)
            results[mode][str(L)] = row
            summary = "  ".join(f"{name} {cell(e, 'time_s', 1e3, '.1f')} ms "
                                f"{cell(e, 'peak_bytes', 2**-20, '.1f')} MiB"
                                for name, e in row.items())
            print(f"[{time.perf_counter() - start:6.1f}s] {mode:9} L={L:<5} {summary}",
                  flush=True)
    info["load_average_end"] = load_average()
    info["wall_s"] = round(time.perf_counter() - start, 1)
    print_table(results, args)
    device_label = info["device_name"] if device.type == "cuda" else f"CPU ({info['device_name']})"
    paths = plot(results, args, device_label)
    print("plots: " + ", ".join(paths))
    print(f"load average at end {info['load_average_end']}, wall {info['wall_s']} s")
    if args.json:
        report = {
            "config": {k: getattr(args, k) for k in (
                "device", "batch", "lengths", "models", "modes", "input_dims", "d_model",
                "n_layers", "d_state", "n_heads", "warmup", "repeats", "seed", "threads")},
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "machine": info, "parameters": params,
            "memory_method": ("torch.cuda.max_memory_allocated - memory_allocated before the "
                              "call" if device.type == "cuda" else
                              "peak RSS (VmHWM after clear_refs) - RSS before the call, fresh "
                              "subprocess per measurement"),
            "results": results,
            "ratios": {mode: {str(L): {b: ratios(results, mode, L, b) for b in args.models[1:]}
                              for L in args.lengths} for mode in args.modes},
            "paper": {"L": PAPER_L, "inference_time_saving_pct": PAPER_TIME_SAVING,
                      "memory_saving_pct": PAPER_MEMORY_SAVING},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
