"""Where the device time goes: one profiled run, every kernel attributed to its source line.

    python scripts/profile_ops.py prefill --model hybrid-kda --context 131072 --out DIR
    python scripts/profile_ops.py prefill --model teacher --context 131072 --out DIR
    python scripts/profile_ops.py distill --seq_len 4096 --steps 4 --out DIR
    python scripts/profile_ops.py prefill --tiny --context 256 --out DIR     # CPU smoke run

`prefill` profiles the time-to-first-token call of scripts/bench_efficiency.py (Qwen3-0.6B config,
random bf16 weights; `--repeats` calls after a warm-up); `distill` profiles a `--steps`-step run of
scripts/bench_distill_step.py's trainer and divides by the step count (model building and
initialisation are in the trace too; the per-module table shows their share). The trace
(`jax.profiler`, perfetto JSON) gives every device kernel's time; XLA's optimised-HLO dump
(written by this process) maps each kernel's HLO op to the Python line that created it, so XLA
fusions (norms, gates, convolutions, casts) are charged to `file:line` and Pallas kernels to
their names. XLA's CUDA-graph command buffers are turned off (they would hide the ops), so
totals can differ slightly from an unprofiled run. Prints a table of the largest rows and a per-file summary, both per call (per
step), and writes DIR/profile.json. Run one target per process: the dump is per process.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_META = re.compile(r"metadata=\{([^}]*)\}")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_KIND = re.compile(r"kind=(\w+)")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_MATMUL = re.compile(r"gemm|nvjet|cutlass|xmma|cublas|gemv|matmul|dot", re.IGNORECASE)


def _stack_tables(text: str) -> dict[int, list[str]]:
    """stack_frame_id -> ['file:line (function)', ...] innermost first, from the FileNames,
    FunctionNames, FileLocations and StackFrames tables at the top of an HLO text dump."""
    def table(name):
        m = re.search(rf"^{name}\n((?:\d+ .*\n)+)", text, re.MULTILINE)
        return {int(line.split(" ", 1)[0]): line.split(" ", 1)[1] for line in (m.group(1).splitlines() if m else [])}

    files = {k: v.strip('"') for k, v in table("FileNames").items()}
    funcs = {k: v.strip('"') for k, v in table("FunctionNames").items()}
    fields = lambda v: {k: int(x) for k, x in re.findall(r"(\w+)=(\d+)", v)}  # noqa: E731
    locs = {k: fields(v) for k, v in table("FileLocations").items()}
    frames = {k: fields(v) for k, v in table("StackFrames").items()}
    stacks = {}
    for start in frames:
        fid, chain, seen = start, [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc = locs.get(frames[fid]["file_location_id"], {})
            chain.append(f"{_short_path(files.get(loc.get('file_name_id'), '?'))}:{loc.get('line', '?')} "
                         f"({funcs.get(loc.get('function_name_id'), '?')})")
            fid = frames[fid].get("parent_frame_id")
        stacks[start] = chain
    return stacks


def parse_hlo(text: str) -> tuple[str, dict[str, tuple[str, str]]]:
    """(module name, {op name: ('file:line (function)' of the innermost frame in this
    repository, else the innermost frame, else the op_name; 'opcode kind shape' of the op)})
    of one optimised-HLO text (an XLA dump, or `jit(f).lower(...).compile().as_text()`). An op
    without metadata of its own (a fusion whose root XLA inserted, a cast) takes that of its
    fused computation's root, or of the computation's last op that has one."""
    header = re.search(r"^HloModule\s+([\w.\-]+)", text, re.MULTILINE)
    module, stacks = (header.group(1) if header else ""), _stack_tables(text)
    ops, computation_meta, computation = [], {}, None
    for line in text.splitlines():
        start = _COMPUTATION.match(line)
        if start:
            computation = start.group(1)
            continue
        m = _OP.match(line)
        if not m:
            continue
        meta_text = _META.search(line)
        meta = {k: v.strip('"') for k, v in _FIELD.findall(meta_text.group(1))} if meta_text else {}
        calls = _CALLS.search(line)
        kind = _KIND.search(line)
        shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # drop layouts
        ops.append((m.group(1), meta, calls.group(1) if calls else None,
                    f"{m.group(3)}{' ' + kind.group(1) if kind else ''} {shape}"))
        if "stack_frame_id" in meta and (line.lstrip().startswith("ROOT") or
                                         "root" not in computation_meta.get(computation, {})):
            computation_meta[computation] = dict(meta, root=line.lstrip().startswith("ROOT"))
    found = {}
    for name, meta, calls, detail in ops:
        if "stack_frame_id" not in meta and calls in computation_meta:
            meta = computation_meta[calls]
        chain = stacks.get(int(meta.get("stack_frame_id", -1)), [])
        ours = [c for c in chain if c.startswith(("hybrid_jax/", "pallas_kernels/"))]
        found[name] = ((ours or chain or [meta.get("op_name", "?")])[0], detail)
    return module, found


def hlo_sources(dump_dir: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(module name, op name) -> `parse_hlo`'s (source, detail), over XLA's after-optimisations
    text dumps in `dump_dir`. Larger modules win a name clash."""
    found: dict[tuple[str, str], tuple[str, str]] = {}
    files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")), key=os.path.getsize)
    for path in files:
        with open(path) as f:
            module, ops = parse_hlo(f.read())
        found.update({(module, op): v for op, v in ops.items()})
    return found


def _short_path(path: str) -> str:
    """A path from the repository root (hybrid_jax/..., pallas_kernels/...) or site-packages."""
    for root in ("hybrid_jax/", "pallas_kernels/", "scripts/", "site-packages/"):
        if root in path:
            return path[path.index(root):].replace("site-packages/", "")
    return os.path.basename(path)


def device_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the device processes of a perfetto trace (the host
    process's XLA thunk events where there is no device, as on the CPU)."""
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "GPU" in n or ("/device:" in n and "CPU" not in n)}
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if gpu and e["pid"] in gpu or not gpu and "hlo_op" in (e.get("args") or {}):
            out.append(e)
    return out


def attribute(events: list[dict], sources: dict, calls: int, modules_re: str = "") -> dict:
    """Rows {label, kind, ms (per call), launches (per call), largest op} of the events of the
    HLO modules matching `modules_re`, per-file and per-module summaries, and the time outside."""
    rows: dict[str, dict] = {}
    op_us: dict[tuple[str, str, str], float] = collections.Counter()
    modules: dict[str, float] = collections.Counter()
    outside = 0.0
    for e in events:
        args = e.get("args") or {}
        name, op, module = e["name"], args.get("hlo_op", ""), args.get("hlo_module", "")
        if modules_re and not re.search(modules_re, module):
            outside += float(e["dur"])
            continue
        modules[module or "(none)"] += float(e["dur"]) / 1e3 / calls
        src, detail = sources.get((module, op), (None, ""))
        if name.startswith(("kda_", "swa_", "ttt_")):
            kind, label = "pallas", name.split(".")[0]
        elif _MATMUL.search(name) or _MATMUL.search(op):
            kind, label = "matmul", f"matmul @ {src or op or name}"
        elif src is None and not op:
            kind, label = "other", name[:60]
        else:
            kind, label = "xla", src or op
        r = rows.setdefault(label, dict(label=label, kind=kind, us=0.0, launches=0, largest_op=""))
        r["us"] += float(e["dur"])
        r["launches"] += 1
        op_us[(label, op, detail)] += float(e["dur"])
    for (label, op, detail), _ in sorted(op_us.items(), key=lambda kv: kv[1]):  # the largest last
        if detail:
            rows[label]["largest_op"] = f"{op}: {detail}"
    table = sorted(rows.values(), key=lambda r: -r["us"])
    for r in table:
        r["ms"] = r.pop("us") / 1e3 / calls
        r["launches"] = r["launches"] / calls
    files = collections.defaultdict(float)
    for r in table:
        key = r["label"] if r["kind"] == "pallas" else r["label"].split(" @ ")[-1].rsplit(":", 1)[0]
        files[f"{r['kind']}: {key}"] += r["ms"]
    return dict(total_ms=sum(r["ms"] for r in table), outside_ms=outside / 1e3 / calls, rows=table,
                modules=[{"module": m, "ms": v} for m, v in modules.most_common()],
                files=sorted(({"file": k, "ms": v} for k, v in files.items()), key=lambda r: -r["ms"]))


def print_report(title: str, result: dict, top: int) -> None:
    total = result["total_ms"]
    print(f"\n## {title}: {total:.2f} ms of device kernels per call "
          f"(+ {result['outside_ms']:.2f} ms in other modules: compiles' autotuning, transfers, set-up)\n")
    print(f"| {'kernel / source line':<60} | kind | ms | % | launches | largest op |\n|---|---|---|---|---|---|")
    for r in result["rows"][:top]:
        print(f"| {r['label'][:60]:<60} | {r['kind']} | {r['ms']:.3f} | {100 * r['ms'] / total:.1f} | "
              f"{r['launches']:g} | {r['largest_op'][:90]} |")
    for title_, key, rows in (("by file", "file", result["files"]), ("by HLO module", "module", result["modules"])):
        print(f"\n| {title_:<60} | ms | % |\n|---|---|---|")
        for r in rows[:top]:
            print(f"| {r[key][:60]:<60} | {r['ms']:.3f} | {100 * r['ms'] / total:.1f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=("prefill", "distill"))
    ap.add_argument("--out", default="runs/profile_ops")
    ap.add_argument("--model", default="hybrid-kda", choices=("teacher", "hybrid-kda", "allmem"))
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="distill: rows per step")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--logit_chunk", type=int, default=1024)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--xla_conv", action="store_true",
                    help="distill: mixer_config.kda.fused_conv=False (XLA's convolutions and L2 norm)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--modules", default=None,
                    help="regex of the HLO modules to attribute (default: the prefill's or the trainer step's)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dump = tempfile.mkdtemp(prefix="xla_dump_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"
                               # CUDA graphs would hide each kernel's HLO op behind one command buffer
                               " --xla_gpu_enable_command_buffer=").strip()
    import jax

    trace = tempfile.mkdtemp(prefix="trace_")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames would fill the trace's event limit before the device's
    if args.target == "prefill":
        from bench_efficiency import QWEN3_0P6B, TINY, build_models

        from hybrid_jax.eval import efficiency

        model = build_models(TINY if args.tiny else QWEN3_0P6B, "float32" if args.tiny else "bfloat16",
                             4096, 512, [args.model])[args.model]
        efficiency.time_to_first_token(model, args.context, repeats=1)  # compile
        with jax.profiler.trace(trace, create_perfetto_trace=True, profiler_options=options):
            seconds = efficiency.time_to_first_token(model, args.context, repeats=args.repeats)
        calls = 1 + args.repeats  # its untimed warm-up call runs inside the trace too
        title = f"prefill, {args.model}, context {args.context} (TTFT {1e3 * seconds:.1f} ms)"
    else:
        from bench_distill_step import train

        with jax.profiler.trace(trace, create_perfetto_trace=True, profiler_options=options):
            train(args.batch, args.seq_len, args.steps, log_every=args.steps, logit_chunk=args.logit_chunk, tiny=args.tiny,
                  fused_conv=not args.xla_conv)
        calls = args.steps
        title = f"distillation step, {args.batch}x{args.seq_len}, per step ({args.steps} steps)"
    modules_re = args.modules if args.modules is not None else ("^jit__prefill$" if args.target == "prefill"
                                                                else "^jit_step$")
    result = attribute(device_events(trace), hlo_sources(dump), calls, modules_re)
    result.update(title=title, device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(args))
    print_report(title, result, args.top)
    with open(os.path.join(args.out, f"profile_{args.target}_{args.model if args.target == 'prefill' else f'step_b{args.batch}'}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
