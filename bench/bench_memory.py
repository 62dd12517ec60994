"""Predicted vs measured runtime memory: the plan's ``runtime.predicted_peak_bytes`` against onnxruntime's real
peak RSS, for every model the bench knows and every ``--quantize`` mode, with the session configuration
each bundle's build chose; then, on the int4 llama-code bundle, each session-configuration lever's memory
and latency, and a measured account of its peak; then the per-bundle choice (MatMulNBits accuracy level 0
or 4, ``[[runtime.choices]]`` in the target file) measured both ways on the bundles it decides for.

Measured, in fresh processes with one onnxruntime thread, through lmc's own runner
(``lmc.core.runtime.open_bundle``: the bundle's session_options.json applied, the heap trimmed after
the load when it asks): the peak RSS (VmHWM) of loading the bundle and running it twice on the bound
shapes, above the RSS after the imports, minus the same for an empty session (one Identity node, run once)
under the same options — the model-attributable peak the prediction is about. The empty session's own
cost is printed once (it is the plan's ``runtime.session_bytes``).

    python bench/bench_memory.py [--no-levers] [--no-choices]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from measures import status  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CALIB_SEQUENCES = 32          # input_ids of the first 32 sequences of code-calib.u16
ROUNDS = 3                    # lever measurements: fresh processes per configuration, interleaved
TIMED_RUNS = 10
LEVEL = "session.qdq_matmulnbits_accuracy_level"
GEN_CONTEXT, GEN_PROMPT, GEN_STEPS = 512, 64, 100   # generation bundles: a 64-token prefill, then decode steps


def _smaps() -> dict[str, int]:
    """Resident bytes by mapping kind: onnxruntime's code, other libraries, heap, anonymous, weight files."""
    out: dict[str, int] = {}
    kind = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", parts[0]):
                name = parts[5] if len(parts) > 5 else ""
                kind = ("onnxruntime code" if "onnxruntime" in name else "libraries" if ".so" in name else
                        "heap" if name == "[heap]" else "anonymous" if not name else
                        "weights file" if name.endswith((".weights", ".data")) else "other")
            elif parts[0] == "Rss:":
                out[kind] = out.get(kind, 0) + int(parts[1]) * 1024
    return out


def _delta(a: dict, b: dict) -> dict:
    return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}


def worker(model: str, feeds: str, settings: str, runs: int, timed: int, iobind: bool, ledger: bool,
           verbose: bool) -> dict:
    import time

    import onnxruntime as ort

    from lmc.core.runtime import bundle_session_options, open_bundle

    if verbose:     # onnxruntime's allocator logs what it reserves (the prepacked copies) at verbose level
        ort.set_default_logger_severity(0)

    data = dict(np.load(feeds)) if feeds != "-" else None
    options = bundle_session_options(model) if settings == "bundle" else json.loads(settings)
    before = _smaps() if ledger else {}
    base = status("VmRSS:")
    sess = open_bundle(model, threads=1, settings=options, log_level=0 if verbose else 3)
    loaded = _smaps() if ledger else {}
    if verbose:
        print("lmc-bench: loaded", file=sys.stderr, flush=True)
    if data is None:      # the empty session
        data = {i.name: np.zeros([1] * len(i.shape), np.float32) for i in sess.get_inputs()}
    if iobind:
        binding = sess.io_binding()
        for name, value in data.items():
            binding.bind_cpu_input(name, value)
        kept = []
        for out in sess.get_outputs():
            buf = np.empty([int(d) for d in out.shape], np.float32)
            kept.append(buf)
            binding.bind_output(out.name, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
        step = lambda: sess.run_with_iobinding(binding)  # noqa: E731
    else:
        step = lambda: sess.run(None, data)  # noqa: E731
    for _ in range(runs):
        step()
    result = {"peak": status("VmHWM:") - base}
    if ledger:
        result["load"], result["run"] = _delta(before, loaded), _delta(loaded, _smaps())
    times, cpu = [], []
    for _ in range(timed):
        t, c = time.perf_counter(), time.thread_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    if times:       # one thread runs the kernels: its CPU time is the latency less what other processes took
        result["ms"], result["cpu_ms"] = statistics.median(times) * 1e3, statistics.median(cpu) * 1e3
    return result


def run_worker(model: Path | str, feeds: Path | str, settings: dict | str = "bundle", runs: int = 2,
               timed: int = 0, iobind: bool = False, ledger: bool = False, verbose: bool = False) -> dict:
    args = [sys.executable, __file__, "--worker", str(model), str(feeds),
            settings if isinstance(settings, str) else json.dumps(settings), str(runs), str(timed)]
    args += ["--iobind"] if iobind else []
    args += ["--ledger"] if ledger else []
    args += ["--verbose"] if verbose else []
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if verbose:   # the prepacked copies onnxruntime reserves while loading
        load_log = done.stderr.split("lmc-bench: loaded")[0]
        result["prepacked"] = sum(int(n) for n in re.findall(r"Reserving memory in BFCArena for Cpu size: (\d+)",
                                                              load_log))
    return result


def gen_worker(path: str, settings: str) -> dict:
    """A generation bundle under ``settings``, one thread: peak RSS above the imports over three prompts of
    GEN_PROMPT tokens (one prefill step each) and GEN_STEPS greedy decode steps after each; the median
    decode step and prefill, wall and CPU time."""
    import time

    from lmc.compiler.drivers import StateDecoder

    tokens = np.fromfile(str(SHARED / "data" / "code-val.u16"), dtype="<u2").astype(np.int64)
    base = status("VmRSS:")
    decoder = StateDecoder(Path(path) / "model.onnx", threads=1, session_options=json.loads(settings))
    times: dict[str, list[float]] = {"prefill_ms": [], "prefill_cpu_ms": [], "decode_ms": [], "decode_cpu_ms": []}

    def step(ids: np.ndarray, kind: str) -> np.ndarray:
        t, c = time.perf_counter(), time.thread_time()
        logits = decoder.forward(ids)
        times[f"{kind}_ms"].append((time.perf_counter() - t) * 1e3)
        times[f"{kind}_cpu_ms"].append((time.thread_time() - c) * 1e3)
        return logits

    for prompt in range(3):
        decoder.reset()
        logits = step(tokens[None, 1000 * prompt: 1000 * prompt + GEN_PROMPT], "prefill")
        for _ in range(GEN_STEPS):
            logits = step(np.array([[int(np.argmax(logits[0, -1]))]]), "decode")
    return {"peak": status("VmHWM:") - base, **{k: statistics.median(v) for k, v in times.items()}}


class Empty:
    """The empty session's peak per session configuration (measured once each)."""

    def __init__(self, work: Path):
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        (work / "empty").mkdir(exist_ok=True)
        self.model = work / "empty" / "model.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(self.model))
        self.cache: dict[str, int] = {}

    def peak(self, settings: dict) -> int:
        key = json.dumps(settings, sort_keys=True)
        if key not in self.cache:
            self.cache[key] = min(run_worker(self.model, "-", settings, runs=1)["peak"] for _ in range(2))
        return self.cache[key]


def cases(work: Path):
    """(label, model path, input shapes, calibration npz or None)."""
    import onnx

    from lmc.models import build_cnn, build_gpt2, build_llama

    llama_code = SHARED / "models" / "llama-code.onnx"
    calib = work / "calib.npz"
    if llama_code.is_file():
        ids = np.fromfile(str(SHARED / "data" / "code-calib.u16"), dtype="<u2").reshape(-1, 256)[:CALIB_SEQUENCES]
        np.savez(calib, input_ids=ids.astype(np.int64)[:, None, :])
        yield "llama-code 1×256", llama_code, {"input_ids": (1, 256)}, calib
    for name, builder, shape in (("tiny-gpt2", build_gpt2, {"input_ids": (1, 64)}),
                                 ("tiny-llama", build_llama, {"input_ids": (1, 64)}),
                                 ("small-cnn", build_cnn, {"image": (1, 3, 32, 32)})):
        path = work / f"{name}.onnx"
        onnx.save(builder(), str(path))
        yield name, path, shape, None


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def choice_label(settings: dict) -> str:
    """The per-bundle choice a bundle's session_options.json carries ('—': the target's options alone)."""
    level = settings.get("config_entries", {}).get(LEVEL)
    return f"MatMulNBits level {level}" if level is not None else "—"


def with_level(settings: dict, level: int) -> dict:
    return {**settings, "config_entries": {**settings.get("config_entries", {}), LEVEL: str(level)}}


def prediction_table(work: Path, empty: Empty) -> dict[str, tuple[Path, Path]]:
    """Print predicted vs measured per model and mode; return the llama-code bundles (model, feeds)."""
    from lmc.compiler.build import BuildOptions, QuantizeMode, build
    from lmc.compiler.verify import random_inputs

    bundles = {}
    print("| model | mode | session choice | predicted | measured | measured / predicted | largest predicted items |")
    print("|---|---|---|---:|---:|---:|---|")
    for label, path, shapes, calib in cases(work):
        for mode in QuantizeMode:
            if mode is QuantizeMode.W8A8 and calib is None:
                continue
            if label == "small-cnn" and mode is QuantizeMode.INT4:
                continue
            out = work / f"{label}-{mode.value}".replace(" ", "_").replace("×", "x")
            try:
                build(path, BuildOptions(target="x86-64", input_shapes=shapes, quantize=mode,
                                         calib=str(calib) if calib and mode is not QuantizeMode.NONE else None,
                                         verify=False), out)
            except Exception as exc:  # a mode a model cannot take: say so in the table
                print(f"| {label} | {mode.value} | — | — | — | — | {str(exc).splitlines()[0][:80]} |")
                continue
            plan = json.loads((out / "plan.json").read_text())
            predicted = plan["runtime"]["predicted_peak_bytes"]
            feeds = work / f"{out.name}-feeds.npz"
            np.savez(feeds, **random_inputs(out / "model.onnx", {k: list(v) for k, v in shapes.items()})[0])
            settings = json.loads((out / "session_options.json").read_text())
            measured = run_worker(out / "model.onnx", feeds)["peak"] - empty.peak(settings)
            items = sorted(plan["runtime"]["items"].items(), key=lambda kv: -kv[1])[:3]
            print(f"| {label} | {mode.value} | {choice_label(settings)} | {mb(predicted)} | {mb(measured)} | "
                  f"{measured / predicted:.2f} | " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in items) + " |")
            if label.startswith("llama-code"):
                bundles[mode.value] = (out / "model.onnx", feeds)
    return bundles


def levers_table(model: Path, feeds: Path, empty: Empty) -> None:
    """Each session-configuration lever on one bundle: model-attributable peak and median latency against
    onnxruntime's defaults (fresh processes, ROUNDS interleaved rounds, TIMED_RUNS timed runs each)."""
    from lmc.targets.target import load_target

    bundle = json.loads((model.parent / "session_options.json").read_text())
    target = load_target("x86-64").runtime.session_options        # the bundle's, less its per-bundle choice
    no_arena = {k: v for k, v in bundle.items() if k != "cpu_arena"}
    no_trim = {k: v for k, v in bundle.items() if k != "trim_heap_after_load"}

    def entries(extra: dict) -> dict:
        return {**bundle, "config_entries": {**bundle.get("config_entries", {}), **extra}}

    configs = [
        ("onnxruntime defaults", {}, False),
        ("memory pattern off", {"enable_mem_pattern": False}, False),
        ("+ one process-wide arena, 16 MiB first chunk", {k: v for k, v in target.items()
                                                           if k != "trim_heap_after_load"}, False),
        ("+ heap trimmed after the load = the target's session options", target, False),
        (f"+ the bundle's choice, {choice_label(bundle)} = the bundle's session_options.json", bundle, False),
        ("bundle, memory pattern on", {**bundle, "enable_mem_pattern": True}, False),
        ("bundle, the session's own arena instead of the process-wide one", no_arena, False),
        ("bundle, no arena (enable_cpu_mem_arena off)", {**no_arena, "enable_cpu_mem_arena": False}, False),
        ("bundle, heap not trimmed", no_trim, False),
        ("bundle, prepacking off (session.disable_prepacking)", entries({"session.disable_prepacking": "1"}),
         False),
        ("bundle, logits bound to a caller buffer (IOBinding)", bundle, True),
    ]
    samples: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    for _ in range(ROUNDS):
        for i, (_, settings, iobind) in enumerate(configs):
            samples[i].append(run_worker(model, feeds, settings, timed=TIMED_RUNS, iobind=iobind))
    reference = statistics.median(s["ms"] for s in samples[0])
    cpu_reference = statistics.median(s["cpu_ms"] for s in samples[0])
    print()
    print(f"Levers on {model.parent.name} (model-attributable peak; latency: median of {ROUNDS} processes × "
          f"{TIMED_RUNS} runs, against onnxruntime's defaults, {reference:.1f} ms; CPU time of the one thread "
          f"running the kernels, {cpu_reference:.1f} ms):")
    print()
    print("| configuration | model-attributable peak | latency × defaults | CPU time × defaults |")
    print("|---|---:|---:|---:|")
    for i, (label, settings, _) in enumerate(configs):
        peak = statistics.median(s["peak"] for s in samples[i]) - empty.peak(settings)
        ms = statistics.median(s["ms"] for s in samples[i])
        cpu = statistics.median(s["cpu_ms"] for s in samples[i])
        print(f"| {label} | {mb(peak)} | {ms / reference:.2f} | {cpu / cpu_reference:.2f} |")


def account(model: Path, feeds: Path, empty: Empty) -> None:
    """What holds one bundle's peak under its session_options.json, each item measured: resident bytes by
    mapping (/proc/self/smaps) after the load and after the runs, against the empty session's, and the
    prepacked copies onnxruntime reserves while loading (its verbose log, a separate process)."""
    import onnx

    bundle = json.loads((model.parent / "session_options.json").read_text())
    mine = run_worker(model, feeds, bundle, ledger=True)
    none = run_worker(empty.model, "-", bundle, runs=1, ledger=True)
    prepacked = run_worker(model, feeds, bundle, runs=0, verbose=True)["prepacked"]
    outputs = sum(4 * int(np.prod([d.dim_value for d in o.type.tensor_type.shape.dim]))
                  for o in onnx.load(str(model), load_external_data=False).graph.output)

    def grew(kind: str, phase: str | None = None) -> int:
        phases = [phase] if phase else ["load", "run"]
        return sum(mine[p].get(kind, 0) - none[p].get(kind, 0) for p in phases)

    load_heap = grew("heap", "load") + grew("anonymous", "load")
    arena = grew("anonymous", "run")
    rows = [("onnxruntime code pages this model's kernels touch (beyond the empty session's)",
             grew("onnxruntime code")),
            ("weight-file pages resident (mapped: what no kernel repacks, e.g. the table the gather reads)",
             grew("weights file")),
            ("prepacked weight copies (reserved at load)", prepacked),
            ("rest of the heap kept after the load (session state, the fusion's block scales)",
             load_heap - prepacked),
            ("arena during the runs: the logits", outputs),
            ("arena during the runs: intermediates", arena - outputs),
            ("C heap during the runs (kernels' per-call buffers)", grew("heap", "run")),
            ("libraries, stack", grew("libraries") + grew("other"))]
    total = mine["peak"] - none["peak"]
    print()
    print(f"What holds {model.parent.name}'s peak under its session_options.json (one process, above the "
          f"empty session's {mb(none['peak'])}):")
    print()
    print("| item | measured |")
    print("|---|---:|")
    for label, value in rows:
        print(f"| {label} | {mb(value)} |")
    print(f"| transient (peak above the resident bytes after the runs) | {mb(total - sum(v for _, v in rows))} |")
    print(f"| model-attributable peak | {mb(total)} |")


def choices_table(work: Path, empty: Empty, bundles: dict[str, tuple[Path, Path]]) -> None:
    """The per-bundle choice measured both ways: each bundle at MatMulNBits accuracy level 4 and 0 (its
    session_options.json with the level set), model-attributable peak and CPU time of a run (one-shot) or
    of a decode step and a GEN_PROMPT-token prefill (generation), fresh processes, ROUNDS interleaved."""
    from lmc.core import ir
    from lmc.compiler.backend import decoded_matmuls
    from lmc.compiler.build import BuildOptions, QuantizeMode, build
    from lmc.core.model_io import load_model
    from lmc.compiler.verify import random_inputs

    ids = np.fromfile(str(SHARED / "data" / "code-calib.u16"), dtype="<u2").reshape(-1, 256)[:CALIB_SEQUENCES]
    one_shot = [("int4 1×256", *bundles["int4"]), ("int8 1×256", *bundles["int8"])]
    for length in (128, 64):
        out = work / f"llama-code-int4-1x{length}"
        np.savez(work / f"calib{length}.npz", input_ids=ids[:, None, :length].astype(np.int64))
        build(SHARED / "models" / "llama-code.onnx", BuildOptions(
            target="x86-64", input_shapes={"input_ids": (1, length)}, quantize=QuantizeMode.INT4,
            calib=str(work / f"calib{length}.npz"), verify=False), out)
        feeds = work / f"{out.name}-feeds.npz"
        np.savez(feeds, **random_inputs(out / "model.onnx", {"input_ids": [1, length]})[0])
        one_shot.append((f"int4 1×{length}", out / "model.onnx", feeds))
    generation = []
    np.savez(work / "calib-gen.npz", input_ids=ids.astype(np.int64))
    for mode in (QuantizeMode.INT4, QuantizeMode.INT8):
        out = work / f"llama-code-past-{mode.value}"
        build(SHARED / "models" / "llama-code-past.onnx", BuildOptions(
            target="x86-64", context=GEN_CONTEXT, quantize=mode, calib=str(work / "calib-gen.npz"), verify=False),
            out)
        generation.append((f"{mode.value} --context {GEN_CONTEXT}", out))

    def holds(model: Path) -> str:
        matmuls = decoded_matmuls(ir.to_graph(load_model(model)))
        bits = "/".join(str(b) for b in sorted({m.bits for m in matmuls}))
        rows = min(m.rows for m in matmuls)
        return f"{bits}-bit, {rows} row{'s' if rows > 1 else ' (decode)'}"

    print()
    print(f"The per-bundle choice (MatMulNBits accuracy level, {LEVEL}), each bundle both ways (median of "
          f"{ROUNDS} processes; one-shot: {TIMED_RUNS} runs, CPU time; generation: {GEN_STEPS} decode steps "
          f"after a {GEN_PROMPT}-token prefill, 3 prompts):")
    print()
    print("| bundle | decoded MatMuls | the build chose | peak, level 4 | peak, level 0 | time, level 4 | "
          "time, level 0 | level 0 / level 4 | level 0 × onnxruntime defaults |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for label, model, feeds in one_shot:
        bundle = json.loads((model.parent / "session_options.json").read_text())
        configs = {"defaults": {}, "4": with_level(bundle, 4), "0": with_level(bundle, 0)}
        samples: dict[str, list[dict]] = {k: [] for k in configs}
        for _ in range(ROUNDS):
            for key, settings in configs.items():
                samples[key].append(run_worker(model, feeds, settings, timed=TIMED_RUNS))
        peak = {k: statistics.median(r["peak"] for r in samples[k]) - empty.peak(configs[k]) for k in configs}
        cpu = {k: statistics.median(r["cpu_ms"] for r in samples[k]) for k in configs}
        print(f"| llama-code {label} | {holds(model)} | {choice_label(bundle)} | {mb(peak['4'])} | {mb(peak['0'])} | "
              f"{cpu['4']:.1f} ms | {cpu['0']:.1f} ms | {cpu['0'] / cpu['4']:.2f} | {cpu['0'] / cpu['defaults']:.2f} |")
    for label, out in generation:
        bundle = json.loads((out / "session_options.json").read_text())
        configs = {"4": with_level(bundle, 4), "0": with_level(bundle, 0)}
        samples = {k: [] for k in configs}
        for _ in range(ROUNDS):
            for key, settings in configs.items():
                done = subprocess.run([sys.executable, __file__, "--gen-worker", str(out), json.dumps(settings)],
                                      capture_output=True, text=True, check=True)
                samples[key].append(json.loads(done.stdout.strip().splitlines()[-1]))
        peak = {k: statistics.median(r["peak"] for r in samples[k]) - empty.peak(configs[k]) for k in configs}
        for kind, what in (("decode", "decode step"), ("prefill", f"{GEN_PROMPT}-token prefill")):
            cpu = {k: statistics.median(r[f"{kind}_cpu_ms"] for r in samples[k]) for k in configs}
            print(f"| llama-code-past {label}, {what} | {holds(out / 'model.onnx')} | {choice_label(bundle)} | "
                  f"{mb(peak['4'])} | {mb(peak['0'])} | {cpu['4']:.2f} ms | {cpu['0']:.2f} ms | "
                  f"{cpu['0'] / cpu['4']:.2f} | — |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5)
    ap.add_argument("--iobind", action="store_true")
    ap.add_argument("--ledger", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-levers", action="store_true")
    ap.add_argument("--no-choices", action="store_true")
    ap.add_argument("--gen-worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        model, feeds, settings, runs, timed = args.worker
        result = worker(model, feeds, settings, int(runs), int(timed), args.iobind, args.ledger, args.verbose)
        print(json.dumps(result))
        return
    if args.gen_worker:
        print(json.dumps(gen_worker(*args.gen_worker)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        empty = Empty(work)
        bundles = prediction_table(work, empty)
        from lmc.targets.target import load_target

        options = load_target("x86-64").runtime.session_options
        print()
        print(f"The empty session itself, under the bundles' session_options.json (not in the rows above): "
              f"{mb(empty.peak(options))}")
        if "int4" in bundles and not args.no_levers:
            levers_table(*bundles["int4"], empty)
            account(*bundles["int4"], empty)
        if "int4" in bundles and "int8" in bundles and not args.no_choices:
            choices_table(work, empty, bundles)


if __name__ == "__main__":
    main()
