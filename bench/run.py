"""`make bench`: jaxnets against Keras 3 (JAX backend), PyTorch and numpy, on this machine, now.

Every contender runs as its own process, back to back and interleaved (repeat r of every
contender before repeat r + 1 of any), `--repeats` times; the table gives min and median.
Writes bench/results/<timestamp>.json (machine, versions, every raw figure) and prints a
markdown table with the ratios.

Run: .venv-bench/bin/python bench/run.py            (full: 3 repeats, 3 epochs of 48,000 images)
     .venv-bench/bin/python bench/run.py --quick    (smoke: 1 repeat, 2 epochs of 6,000 images)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import workload  # noqa: E402

# name -> (script, arguments). The first is the reference of the ratios.
CNN = {
    "jaxnets (defaults: native convs, measured steps/dispatch)": ("jaxnets_cnn.py", []),
    "jaxnets (im2col convs)": ("jaxnets_cnn.py", ["--conv-impl", "im2col"]),
    "Keras 3 fit, JAX backend": ("keras_cnn.py", []),
    "PyTorch eager (faster of 1 and 2 threads)": ("torch_cnn.py", []),
    "PyTorch torch.compile (faster of 1 and 2 threads)": ("torch_cnn.py", ["--compile"]),
}
# With --all. On a quiet machine 2 threads is PyTorch's best (torch.compile 2.8 s/epoch against
# 3.6 s with 1); on a loaded 2-core machine 1 thread measured up to 5x faster (OpenMP barriers
# wait for a descheduled thread), so the default rows measure both and keep the faster.
CNN_MORE = {
    "jaxnets (1 step/dispatch)": ("jaxnets_cnn.py", ["--steps-per-dispatch", "1"]),
    "jaxnets (lax.conv, measured steps/dispatch)": ("jaxnets_cnn.py", ["--conv-impl", "xla"]),
    "jaxnets (lax.conv, 10 steps/dispatch)": (
        "jaxnets_cnn.py",
        ["--conv-impl", "xla", "--steps-per-dispatch", "10"],
    ),
    "PyTorch eager, 2 threads": ("torch_cnn.py", ["--threads", "2"]),
    "PyTorch torch.compile, 2 threads": ("torch_cnn.py", ["--compile", "--threads", "2"]),
}

# Users' models (not the seed CNN): jaxnets' ways come from one fit_vs_loop.py process per repeat.
USERS_PEERS = {
    "Keras 3 fit, JAX backend": ("users_peers.py", ["--framework", "keras"]),
    "PyTorch eager (faster of 1 and 2 threads)": ("users_peers.py", ["--framework", "torch"]),
    "PyTorch torch.compile (faster of 1 and 2 threads)": (
        "users_peers.py",
        ["--framework", "torch", "--compile"],
    ),
}
USERS_PEERS_MORE = {
    "PyTorch eager, 2 threads": ("users_peers.py", ["--framework", "torch", "--threads", "2"]),
    "PyTorch torch.compile, 2 threads": (
        "users_peers.py",
        ["--framework", "torch", "--compile", "--threads", "2"],
    ),
}
USERS_REF = "jaxnets fit (measured steps/call)"


def machine() -> dict:
    """CPU model, cores, clock, SIMD, and the float32 FMA peak of all cores."""
    info = {"platform": platform.platform(), "python": platform.python_version()}
    model, mhz, flags = "unknown", None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    model = value
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    cores = os.cpu_count() or 1
    info.update(cpu_model=model, cores=cores, mhz=mhz)
    info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    if mhz:
        # cores x 2 FMA pipes x lanes x 2 flops (multiply + add) x clock.
        info["peak_gflops_avx2_fma"] = cores * 2 * 8 * 2 * mhz / 1e3
        if "avx512f" in flags:
            info["peak_gflops_avx512_fma"] = cores * 2 * 16 * 2 * mhz / 1e3
    return info


def run_one(script: str, args: list[str]) -> dict:
    env = dict(os.environ, KERAS_BACKEND="jax")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, script), *args],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_s"] = time.perf_counter() - start
    return result


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "keras", "torch", "numpy"):
        try:
            out[name] = __import__("importlib.metadata").metadata.version(name)
        except Exception:  # not installed in this environment
            out[name] = None
    return out


def stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values)} if values else {}


def _with_threads(label: str, runs: list[dict]) -> str:
    """The label with the PyTorch thread count each run chose, where it chose one."""
    if "threads" not in runs[0]:
        return label
    return f"{label} [threads: {', '.join(str(r['threads']) for r in runs)}]"


def cnn_table(cnn: dict, peak: float | None, epochs: int) -> str:
    ok = {name: [r for r in runs if "error" not in r] for name, runs in cnn.items()}
    ref = next(iter(cnn))
    ref_median = stats([r["steady_epoch_s"] for r in ok[ref]]).get("median")
    flops = next((r["step_flops"] for r in ok[ref] if "step_flops" in r), None)
    rows = [
        f"| seed CNN ({epochs} epochs) | first epoch s | s/epoch min | s/epoch median | "
        f"images/s (best) | val acc | {ref.split(' (')[0]} speed-up (median) | GFLOP/s (best) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in ok.items():
        if not runs:
            rows.append(f"| {name} | failed: {cnn[name][0]['error'][-200:]!r} |||||||")
            continue
        s = stats([r["steady_epoch_s"] for r in runs])
        first = statistics.median(r["first_epoch_s"] for r in runs)
        acc = statistics.median(r["val_accuracy"] for r in runs)
        images = max(r["images_per_s"] for r in runs)
        gflops = ""
        if flops:
            g = flops * images / workload.BATCH / 1e9
            gflops = f"{g:.1f}" + (f" ({100 * g / peak:.0f}% of peak)" if peak else "")
        ratio = f"{s['median'] / ref_median:.2f}x" if ref_median else ""
        name = _with_threads(name, runs)
        rows.append(
            f"| {name} | {first:.2f} | {s['min']:.2f} | {s['median']:.2f} | {images:,.0f} | "
            f"{acc:.4f} | {ratio} | {gflops} |"
        )
    return "\n".join(rows)


def two_layer_table(runs: list[dict], peak_gflops: float | None) -> str:
    runs = [r for r in runs if "error" not in r]
    if not runs:
        return "two-layer: failed"
    nets = f"{runs[0]['nets']:,} nets"
    threads = runs[0].get("torch_threads", 1)
    keys = [
        ("jaxnets_one_s", "jaxnets, one net (two_layer_train_many)"),
        ("numpy_one_f64_s", "numpy tutorial loop, one net, float64"),
        ("jaxnets_many_s", f"jaxnets, {nets} (two_layer_train_many), 1 device"),
        ("jaxnets_many_2dev_s", f"jaxnets, {nets}, sharded over 2 CPU devices (one per core)"),
        ("numpy_nets_last_many_f32_s", f"numpy nets-last, one GEMM for X, in place, {nets}, f32"),
        ("torch_nets_last_many_f32_s", f"PyTorch nets-last eager, {nets}, f32, {threads} thread"),
        (
            "torch_compile_nets_last_many_f32_s",
            f"PyTorch nets-last torch.compile, {nets}, f32, {threads} thread",
        ),
        ("numpy_einsum_many_f32_s", f"for reference: numpy einsum, nets first, {nets}, f32"),
        ("torch_bmm_many_f32_s", f"for reference: PyTorch bmm, nets first, {nets}, f32"),
    ]
    rows = [
        "| two-layer net, 1500 iterations | s min | s median | slower than jaxnets (median) |",
        "|---|---|---|---|",
    ]
    for key, label in keys:
        values = [r[key] for r in runs if key in r]
        if not values:
            continue
        s = stats(values)
        ref = "jaxnets_one_s" if "_one_" in key else "jaxnets_many_s"
        ratio = s["median"] / statistics.median(r[ref] for r in runs)
        rows.append(f"| {label} | {s['min']:.4f} | {s['median']:.4f} | {ratio:.1f}x |")
    compile_s = statistics.median(r["jaxnets_many_compile_s"] for r in runs)
    rows.append(f"| (jaxnets many nets: compile + first run) | {compile_s:.2f} | | |")
    r = runs[0]
    if peak_gflops and "flops_per_net_iteration" in r:
        best = min(
            x.get(k, x["jaxnets_many_s"])
            for x in runs
            for k in ("jaxnets_many_s", "jaxnets_many_2dev_s")
        )
        roofline = r["nets"] * r["iterations"] * r["flops_per_net_iteration"] / peak_gflops / 1e9
        rows.append(
            f"\nRoofline: {r['flops_per_net_iteration']} FLOPs and {r['exps_per_net_iteration']} "
            f"exp per net-iteration, {r['nets'] * r['iterations'] / 1e6:.1f} M net-iterations: "
            f"{roofline:.3f} s at the {peak_gflops:.0f} GFLOP/s float32 FMA peak of all cores "
            f"(exp and divide not counted); jaxnets' best row is {best / roofline:.1f}x that."
        )
    return "\n".join(rows)


def users_tables(users: dict, num_train: int) -> list[str]:
    """One table per users' model: every way and peer, s/epoch, images/s, ratio, accuracy."""
    per_model: dict = {}
    second: dict = {}
    for contender, runs in users.items():
        for run in runs:
            if "error" in run:
                per_model.setdefault("failed", {})[contender] = run["error"][-300:]
                continue
            for model, value in run.items():
                if model == "second_fit_call":  # compiles of a second fit call, not timings
                    for name, c in value.items():
                        second.setdefault(name, []).append(c)
                    continue
                if not isinstance(value, dict):
                    continue
                ways = value if contender == "jaxnets" else {"": value}
                for way, r in ways.items():
                    label = f"jaxnets {way}" if contender == "jaxnets" else contender
                    rs = r if isinstance(r, list) else [r]
                    per_model.setdefault(model, {}).setdefault(label, []).extend(rs)
    lines = [
        f"Users' model {name}: a second `fit` call compiled {c['compiles']} program(s) and ran "
        f"{c['programs_run']} (steps per call {c['k']}, recorded by the first call)"
        for name, cs in second.items()
        for c in cs[-1:]
    ]
    for model, contenders in per_model.items():
        if model == "failed":
            lines += [f"Users' models: {name} failed: {err!r}" for name, err in contenders.items()]
            continue
        ref = contenders.get(USERS_REF)
        ref_median = statistics.median(r["steady_epoch_s"] for r in ref) if ref else None
        lines += [
            "",
            f"| users' model {model} ({num_train:,} images, batch 100) | s/epoch min | "
            "s/epoch median | images/s (best) | train acc (last epoch) | "
            "slower than jaxnets fit (median) | steps/call |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, rs in contenders.items():
            s = stats([r["steady_epoch_s"] for r in rs])
            ratio = f"{s['median'] / ref_median:.2f}x" if ref_median else ""
            label = _with_threads(label, rs)
            lines.append(
                f"| {label} | {s['min']:.3f} | {s['median']:.3f} | "
                f"{num_train // 100 * 100 / s['min']:,.0f} | {rs[-1]['train_accuracy']:.3f} | "
                f"{ratio} | {rs[-1]['steps_per_call']} |"
            )
    return lines


def stream_lines(stream: dict) -> list[str]:
    """The streamed-input section: the seed CNN resident vs streamed, and the large set."""
    out = []
    ok = {h: [r for r in stream[h] if "error" not in r] for h in ("resident", "stream")}
    if ok["resident"] and ok["stream"]:
        res, st = (stats([r["steady_epoch_s"] for r in ok[h]]) for h in ("resident", "stream"))
        first = ok["resident"][0]
        images = round(first["images_per_s"] * first["steady_epoch_s"])
        out += [
            f"Input (seed CNN, {images:,} training images, steady s/epoch):",
            "| input | s/epoch min | median | throughput vs resident (median) |",
            "|---|---|---|---|",
            f"| resident (gathered on the device) | {res['min']:.3f} | {res['median']:.3f} "
            "| 1.00 |",
            f"| streamed (Grain, read ahead on the host) | {st['min']:.3f} | {st['median']:.3f} "
            f"| {res['median'] / st['median']:.2f} |",
        ]
    for key in ("large", "small"):
        r = stream.get(key)
        if not r:
            continue
        if "error" in r:
            out.append(f"Streamed {key} set: failed: {r['error'][-300:]}")
            continue
        out.append(
            f"Streamed .npy of {r['num_images']:,} images ({r['data_bytes'] / 1e6:,.0f} MB), "
            f"{r['steps']} steps: {r['images_per_s']:,.0f} images/s; peak memory "
            f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB RSS ({r['peak_anon_bytes'] / 2**20:,.0f} "
            f"MiB anonymous, {r['peak_file_bytes'] / 2**20:,.0f} MiB file-backed: libraries)."
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 epochs, 6,000 images")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--all",
        action="store_true",
        help="also lax.conv seed CNN, 2-thread PyTorch, users' models at 10 forced steps/call",
    )
    parser.add_argument(
        "--only", default="", help="comma list of: cnn,two_layer,data,ckpt,users,stream,hooks"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    parts = (
        set(args.only.split(","))
        if args.only
        else {"cnn", "two_layer", "data", "ckpt", "users", "stream", "hooks"}
    )
    big = ["--num-images", "200000", "--steps", "100"] if args.quick else []
    small = [
        "--num-images",
        "20000" if args.quick else "50000",
        "--steps",
        "100" if args.quick else "300",
    ]
    users_args = ["--num-train", "6400", "--epochs", "3"]
    if args.quick:
        size = ["--epochs", "2", "--num-train", "6000", "--num-val", "1000"]
        tl_args, ck_args = ["--nets", "1000", "--scaled-iterations", "30"], ["--num-train", "6000"]
        hk_args = ["--num-train", "6000", "--num-val", "1000", "--epochs", "3", "--repeats", "1"]
        users_args = ["--num-train", "1600", "--epochs", "2"]
    else:
        size, tl_args, ck_args, hk_args = [], [], [], ["--repeats", str(repeats)]
    epochs = 2 if args.quick else workload.EPOCHS
    contenders = {**CNN, **CNN_MORE} if args.all else CNN
    users_peers = {**USERS_PEERS, **USERS_PEERS_MORE} if args.all else USERS_PEERS
    if args.all:
        users_args += ["--forced-steps", "10"]

    info = machine()
    peak = info.get("peak_gflops_avx2_fma")
    results: dict = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "load_average_start": list(os.getloadavg()),  # 1, 5, 15 min: the neighbours' load
        "versions": versions(),
        "workload": {
            "batch": workload.BATCH,
            "lr": workload.LEARNING_RATE,
            "momentum": workload.MOMENTUM,
            "nesterov": True,
            "decay": workload.DECAY,
            "epochs": epochs,
            "quick": args.quick,
            "repeats": repeats,
        },
        "cnn": {name: [] for name in contenders} if "cnn" in parts else {},
        "two_layer": [],
        "data_load": [],
        "checkpoint": [],
        "hooks": [],
        "users": {},
        "stream": {"resident": [], "stream": [], "large": None, "small": None},
    }
    for r in range(repeats):
        for name, (script, extra) in contenders.items():
            if "cnn" not in parts:
                break
            flops = ["--flops"] if r == 0 and script == "jaxnets_cnn.py" else []
            res = run_one(script, [*extra, *size, *flops])
            results["cnn"][name].append(res)
            print(f"[{r + 1}/{repeats}] {name}: {res.get('epoch_s', res.get('error'))}", flush=True)
        if "two_layer" in parts:
            results["two_layer"].append(run_one("two_layer.py", tl_args))
            print(f"[{r + 1}/{repeats}] two-layer done", flush=True)
        if "data" in parts:
            results["data_load"].append(run_one("data_load.py", []))
        if "users" in parts:  # jaxnets' ways (one process), then each peer, every repeat
            users = results["users"]
            users.setdefault("jaxnets", []).append(
                run_one("fit_vs_loop.py", [*users_args, "--repeats", "1"])
            )
            for name, (script, extra) in users_peers.items():
                users.setdefault(name, []).append(run_one(script, [*extra, *users_args]))
            print(f"[{r + 1}/{repeats}] users' models done", flush=True)
        if "stream" in parts:  # the seed CNN resident vs streamed, interleaved
            for how in ("resident", "stream"):
                res = run_one("jaxnets_cnn.py", ["--input", how, *size])
                results["stream"][how].append(res)
                print(f"[{r + 1}/{repeats}] {how}: {res.get('epoch_s', res.get('error'))}")
    if "ckpt" in parts:
        results["checkpoint"].append(run_one("checkpoint_overhead.py", ck_args))
    if "hooks" in parts:
        results["hooks"].append(run_one("hooks_overhead.py", hk_args))
    if "stream" in parts:
        results["stream"]["large"] = run_one("stream_1m.py", big)
        results["stream"]["small"] = run_one("stream_1m.py", small)

    lines = [
        f"Machine: {info['cpu_model']}, {info['cores']} cores, {info['mhz']} MHz, "
        f"{'/'.join(info['simd'])}; float32 FMA peak {peak or 0:.0f} GFLOP/s (AVX2) "
        f"/ {info.get('peak_gflops_avx512_fma', 0):.0f} (AVX-512). "
        f"Repeats: {repeats} processes each.",
        "",
    ]
    if results["cnn"]:
        lines += [cnn_table(results["cnn"], peak, epochs), ""]
    if results["two_layer"]:
        best_peak = info.get("peak_gflops_avx512_fma") or peak
        lines += [two_layer_table(results["two_layer"], best_peak), ""]
    loads = [r for r in results["data_load"] if "error" not in r]
    if loads:
        first = stats([r["first_load_s"] for r in loads])
        cached = stats([r["cached_load_s"] for r in loads])
        lines.append(
            f"Data: load + device_put of {loads[0]['images']:,} images: first "
            f"{first['min']:.2f} s (median {first['median']:.2f}), cached {cached['min']:.2f} s "
            f"(median {cached['median']:.2f})."
        )
    ck = [r for r in results["checkpoint"] if "error" not in r]
    if ck:
        c = ck[0]
        each = "; ".join(
            f"every {i['save_every_steps']} steps ({i['saves_per_epoch']:.1f} saves/epoch): "
            f"{i['epoch_s']:.2f} s/epoch ({100 * i['overhead_fraction']:+.1f}%)"
            for i in c["intervals"]
        )
        lines.append(
            f"Checkpoints (async, median of {len(c['raw_epoch_s']['none'])} interleaved runs): "
            f"none {c['epoch_s_none']:.2f} s/epoch; {each}. One save of the "
            f"{c['state_bytes'] / 1e3:.0f} kB state costs {c['save_cpu_ms']:.0f} ms of CPU "
            f"({c['save_wall_ms']:.0f} ms wall, idle machine): at most "
            f"{100 * c['save_cpu_ms'] / 1e3 / c['epoch_s_none']:.1f}% of an epoch per save "
            "(as if none of it overlapped training; differences between interleaved epoch "
            "times smaller than the machine's noise are not an overhead)."
        )
    hk = [r for r in results["hooks"] if "error" not in r]
    if hk:
        h = hk[0]
        host = sorted(h["feature_hooks_host_fraction_per_epoch"] or [float("nan")])
        lines.append(
            f"Hooks 1-6 of issue 27 (health metrics, Throughput, best-2 checkpoints, early "
            f"stopping, a profiler window; logging every 10 steps), seed CNN steady epochs, "
            f"median of {len(h['paired_ratios'])} interleaved runs: base "
            f"{h['median_base_s']:.3f} s/epoch, with them {h['median_all_s']:.3f} s/epoch: "
            f"{h['ratio_of_medians']:.3f}x (goal < 1.02); their host time "
            f"{100 * host[len(host) // 2]:.2f}% of an epoch; the step with health metrics "
            f"{h['health_step_ratio']:.3f}x the plain one (min of interleaved rounds)."
        )
    elif results["hooks"]:
        lines.append(f"Hooks overhead: failed: {results['hooks'][0]['error'][-300:]!r}")
    if results["users"]:
        lines += users_tables(results["users"], int(users_args[1]))
    if "stream" in parts:
        lines += ["", *stream_lines(results["stream"])]
    results["load_average_end"] = list(os.getloadavg())
    lines.append(
        f"\nLoad average (1/5/15 min) at start {results['load_average_start']}, "
        f"at end {results['load_average_end']}."
    )
    table = "\n".join(lines)
    results["table"] = table
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    path = os.path.join(HERE, "results", f"{stamp}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(table)
    print(f"\nwritten: {os.path.relpath(path)}")
    return results


if __name__ == "__main__":
    main()
