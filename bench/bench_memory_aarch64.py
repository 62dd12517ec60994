"""Runtime memory on aarch64: the cortex-a55 target's runtime prediction against the model-attributable peak
measured with the aarch64 onnxruntime under qemu-user, the emulator's own memory separated out, beside the
same bundles measured on this x86-64 host.

The bundles: llama-code for ``--target cortex-a55`` as ``bench/bench_aarch64.py`` builds them (one-shot
1×256 exact/int8/int4/w8a8, generation ``--context 512`` exact/int4, in ``bench/_work/aarch64``).
Measured as ``bench/bench_memory.py`` measures (its pieces imported): a fresh process loads the bundle
under its ``session_options.json`` with one thread, the heap trimmed after the load, and runs it twice on
the bound shapes (a generation bundle: a GEN_PROMPT-token prefill and GEN_STEPS decode steps, its state in
place); its peak above the process after the imports, minus the same for an empty one-Identity session
under the same options. On x86-64 through lmc's runner (``bench_memory.run_worker``; generation:
``bench_memory.gen_worker``, 3 prompts of 64 tokens and 100 decode steps each). On aarch64 through the
emulated worker (``lmc/compiler/target_worker.py``, task ``memory``: numpy and onnxruntime only, the same
session options and trim), where the emulator's memory is separated by mapping: qemu emulates
/proc/self/maps (the guest's mappings) while smaps is the host's, and guest addresses are host addresses,
so the guest's resident bytes are the smaps Rss of the ranges maps lists; its peak is sampled by a thread
while onnxruntime loads and runs (every INTERVAL s; a run takes tens of seconds there), shown beside VmHWM less
the emulator's resident before the load (an upper bound) and after the runs (a lower one only if the
emulator never shrinks; it does, by a few MB). "x86-64, worker": the same worker on the host, the method's own offset.

Predicted: the runtime model of the target file as it is now (``lmc.compiler.backend``'s prediction on the
bundle's graph and its plan's arena and state); "plan.json at build": the figure the bundle's build wrote,
under the target file as it was then. Emulated runs take minutes: results are cached in
``bench/_work/memory-aarch64`` by bundle contents and task (``--fresh`` measures again).

    python bench/bench_memory_aarch64.py [--bundles oneshot-int4,oneshot-none] [--account] [--fresh]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_memory  # noqa: E402
from bench_memory import SHARED, Empty, mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bench" / "_work" / "aarch64"
WORK = ROOT / "bench" / "_work" / "memory-aarch64"
NAMES = ("oneshot-none", "oneshot-int4", "oneshot-int8", "oneshot-w8a8", "past-none", "past-int4")
GEN_PROMPT, GEN_STEPS = 64, 16
INTERVAL = 0.2                # seconds between the emulated worker's samples of the guest's resident bytes
EMPTY_INTERVAL = 0.02         # the empty session: a short process, sampled densely
METHOD = 2                    # the worker's way of measuring: cached results of another are measured again
LEDGER_KINDS = ("onnxruntime code", "weights file", "anonymous", "libraries", "other")


def label(name: str) -> str:
    kind, mode = name.split("-", 1)
    mode = "exact" if mode == "none" else mode
    return f"one-shot 1×256 {mode}" if kind == "oneshot" else f"generation --context 512 {mode}"


def digest(bundle: Path) -> str:
    """The bundle's identity: its model and weights files' contents."""
    h = hashlib.sha256()
    for name in ("model.onnx", "model.weights", "session_options.json"):
        path = bundle / name
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


class Cache:
    """Results of emulated runs in ``WORK/results.json``, keyed by what they depend on."""

    def __init__(self, fresh: bool):
        self.path = WORK / "results.json"
        self.data = {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        return self.data[key]


def predicted(bundle: Path) -> tuple[int, dict]:
    """The target file's runtime prediction for ``bundle`` now (its graph, its plan's arena and state; the
    inputs and outputs as its plan counted them, bound to the bundle's profile)."""
    from lmc.compiler.backend import runtime_for, weight_readers
    from lmc.core import ir
    from lmc.core.model_io import load_model
    from lmc.targets.target import load_target

    plan = json.loads((bundle / "plan.json").read_text())
    items = plan["runtime"]["items"]
    graph = ir.to_graph(load_model(bundle / "model.onnx"))
    model = runtime_for(graph, load_target(plan["target"]))
    state = sum(b["size"] for b in (plan.get("state") or {}).get("buffers", []))
    out = model.predict(weight_readers(graph), plan["arena_bytes"], items["inputs"],
                        items["outputs"] // max(1, model.output_copies), state, nodes=len(graph.nodes))
    return out.peak_bytes, out.items


def settings_of(bundle: Path) -> dict:
    return json.loads((bundle / "session_options.json").read_text())


def generation_task(bundle: Path) -> tuple[dict, dict]:
    """The worker task driving a generation bundle: one prompt of GEN_PROMPT validation tokens, then
    GEN_STEPS single-token steps (the tokens that follow; memory does not depend on which)."""
    from lmc.compiler.drivers import generation_info
    from lmc.compiler.on_target import worker_info

    info = generation_info(bundle / "model.onnx")
    tokens = np.fromfile(str(SHARED / "data" / "code-val.u16"), dtype="<u2")[:GEN_PROMPT + GEN_STEPS]
    spans = [(0, GEN_PROMPT)] + [(i, i + 1) for i in range(GEN_PROMPT, GEN_PROMPT + GEN_STEPS)]
    return ({"driver": "state", "info": worker_info(info), "tokens": "tokens", "spans": spans},
            {"tokens": tokens.astype(np.int64)[None, :]})


def one_shot_feeds(bundle: Path) -> Path:
    from lmc.compiler.verify import random_inputs

    feeds = WORK / f"{bundle.name}-feeds.npz"
    if not feeds.is_file():
        np.savez(feeds, **random_inputs(bundle / "model.onnx", {"input_ids": [1, 256]})[0])
    return feeds


class Machines:
    """Measures tasks of the emulated worker (aarch64) and the host's worker, and the empty session's."""

    def __init__(self, cache: Cache):
        from lmc.compiler.on_target import find_emulator
        from lmc.targets.target import load_target

        self.cache = cache
        self.emulator = find_emulator(load_target("cortex-a55").isa.emulator_cpu)
        self.empty = Empty(WORK)

    def task(self, bundle: Path, machine: str, **extra) -> dict:
        """The ``memory`` task's result for ``bundle`` (None: the empty session under ``extra['settings']``)
        on ``machine`` ("aarch64" or "host")."""
        from lmc.compiler.on_target import run_worker

        settings = extra.pop("settings", None) or settings_of(bundle)
        task = {"kind": "memory", "id": "m", "threads": 1, "settings": settings, "interval": INTERVAL, **extra}
        arrays: dict = {}
        if bundle is None:
            task.update(model=str(self.empty.model), runs=1, interval=EMPTY_INTERVAL)
        elif bundle.name.startswith("past-"):
            gen, arrays = generation_task(bundle)
            task.update(model=str(bundle / "model.onnx"), **gen)
        else:
            task.update(model=str(bundle / "model.onnx"), feeds="f", runs=2)
            arrays = {f"f/{k}": v for k, v in np.load(one_shot_feeds(bundle)).items()}
        task.update(extra)
        key = json.dumps([METHOD, machine, digest(bundle) if bundle else "empty", {k: v for k, v in task.items()
                                                                           if k not in ("model", "info")}],
                         sort_keys=True)

        def compute() -> dict:
            results, _, _ = run_worker([task], arrays, self.emulator if machine == "aarch64" else None)
            if "error" in results[0]:
                raise RuntimeError(f"{bundle}: {results[0]['error']}")
            return results[0]

        if machine == "host":          # fast and noisy: measured every time
            return compute()
        return self.cache.get(key, compute)

    def empty_peak(self, machine: str, settings: dict) -> int:
        """The empty session's peak under ``settings`` (the least of two processes, as bench_memory's)."""
        return min(self.task(None, machine, settings=settings, round=i)["peak"] for i in range(2))

    def aarch64(self, bundle: Path) -> tuple[int, dict]:
        result = self.task(bundle, "aarch64")
        return result["peak"] - self.empty_peak("aarch64", settings_of(bundle)), result

    def host_worker(self, bundle: Path) -> int:
        return self.task(bundle, "host")["peak"] - self.empty_peak("host", settings_of(bundle))

    def x86(self, bundle: Path) -> int:
        """bench_memory's measurement through lmc's own runner."""
        settings = settings_of(bundle)
        if bundle.name.startswith("past-"):
            done = subprocess.run([sys.executable, bench_memory.__file__, "--gen-worker", str(bundle),
                                   json.dumps(settings)], capture_output=True, text=True, check=True)
            peak = json.loads(done.stdout.strip().splitlines()[-1])["peak"]
        else:
            peak = bench_memory.run_worker(bundle / "model.onnx", one_shot_feeds(bundle))["peak"]
        return peak - self.empty.peak(settings)


def account(machines: Machines, bundle: Path) -> None:
    """What holds the bundle's peak on each machine: the guest's resident bytes by mapping kind after the
    load and after the runs, above the empty session's; the prepacked copies from onnxruntime's verbose log
    of a separate load."""
    settings = settings_of(bundle)
    rows: dict[str, dict[str, float]] = {}
    for machine in ("host", "aarch64"):
        mine = machines.task(bundle, machine, ledger=True)
        none = machines.task(None, machine, settings=settings, ledger=True, interval=INTERVAL)
        prepacked = machines.task(bundle, machine, log=str(WORK / f"{machine}-ort.log"), runs=0, spans=[],
                                  interval=INTERVAL)["prepacked"]

        def grew(kind: str, phase: str) -> int:
            return mine[phase].get(kind, 0) - none[phase].get(kind, 0)

        values = {"code pages (onnxruntime, beyond the empty session's)": grew("onnxruntime code", "load")
                  + grew("onnxruntime code", "run"),
                  "weight-file pages resident": grew("weights file", "load") + grew("weights file", "run"),
                  "prepacked copies (reserved at load)": prepacked,
                  "rest of the anonymous memory kept after the load": grew("anonymous", "load") - prepacked,
                  "anonymous memory the runs add (arena, per-call buffers)": grew("anonymous", "run"),
                  "libraries, other": sum(grew(k, p) for k in ("libraries", "other") for p in ("load", "run"))}
        values["transient (peak above the resident bytes after the runs)"] = (
            mine["peak"] - none["peak"] - sum(values.values()))
        values["model-attributable peak (this process)"] = mine["peak"] - none["peak"]
        for k, v in values.items():
            rows.setdefault(k, {})[machine] = v
    print()
    print(f"What holds {bundle.name}'s peak (worker processes, the guest's bytes by mapping, above the empty "
          f"session's):")
    print()
    print("| item | x86-64 | aarch64 |")
    print("|---|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {mb(v['host'])} | {mb(v['aarch64'])} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundles", default=",".join(NAMES))
    ap.add_argument("--account", default="", help="bundles whose peak to account item by item on both machines")
    ap.add_argument("--fresh", action="store_true", help="measure the emulated runs again")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.bundles.split(",") if n]
    missing = [n for n in names if not (BUNDLES / n / "model.onnx").is_file()]
    if missing:
        sys.exit(f"bundles missing in {BUNDLES}: {', '.join(missing)} (python bench/bench_aarch64.py builds them)")
    machines = Machines(Cache(args.fresh))
    rows = []
    for name in names:
        bundle = BUNDLES / name
        pred, items = predicted(bundle)
        arm, raw = machines.aarch64(bundle)
        built = json.loads((bundle / "plan.json").read_text())["runtime"]["predicted_peak_bytes"]
        rows.append((name, pred, built, arm, raw, machines.x86(bundle), machines.host_worker(bundle)))
    print("| bundle | predicted | measured on aarch64 | aarch64 / predicted | measured on x86-64 | "
          "aarch64 / x86-64 | x86-64, worker | plan.json at build | aarch64 / plan.json |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, pred, built, arm, _, x86, worker in rows:
        print(f"| llama-code {label(name)} | {mb(pred)} | {mb(arm)} | {arm / pred:.2f} | {mb(x86)} | "
              f"{arm / x86:.2f} | {mb(worker)} | {mb(built)} | {arm / built:.2f} |")
    print()
    print("The emulated processes (the bundle's, before the empty session's is subtracted): the guest's peak "
          "sampled (the measurement), VmHWM less the emulator's resident after the runs / before the load, the "
          "emulator's resident:")
    print()
    print("| bundle | sampled | VmHWM bounds | emulator before → after | samples | straddling mappings |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, _, _, raw, _, _ in rows:
        print(f"| {name} | {mb(raw['peak'])} | {mb(raw['hwm_low'])} – {mb(raw['hwm_high'])} | "
              f"{mb(raw['emulator_before'])} → {mb(raw['emulator_after'])} | {raw['samples']} | "
              f"{mb(raw['straddling'])} |")
    settings = settings_of(BUNDLES / names[0])
    print()
    print(f"The empty session itself (above the imports): aarch64 {mb(machines.empty_peak('aarch64', settings))}, "
          f"x86-64 {mb(machines.empty.peak(settings))} (lmc's runner), "
          f"{mb(machines.empty_peak('host', settings))} (the worker)")
    for name in [n for n in args.account.split(",") if n]:
        account(machines, BUNDLES / name)


if __name__ == "__main__":
    main()
