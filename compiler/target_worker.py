"""The half of ``lmc verify --on`` that runs on the target's instruction set (``lmc.compiler.on_target`` is
the other): a self-contained script — Python's standard library, numpy and onnxruntime, no lmc — that an
emulated interpreter (qemu-user, an arm64 root) or the host's runs as

    python3 -I target_worker.py SITE_PACKAGES JOB_DIR

``JOB_DIR/job.json`` lists tasks, run in order, each on its own session (dropped before the next):
- ``run``: a model on feeds (``in.npz`` arrays ``FEED/NAME``); outputs saved as ``ID/SAMPLE/NAME``;
- ``decode``: a generation model over token spans (``spans``: consecutive (start, end) calls over the
  ``tokens`` array [B, L]), driven as ``lmc.compiler.drivers`` drives it — ``driver`` ``state``: a bundle,
  its state bound in place with IOBinding (the same OrtValue its ``past`` input and ``present`` output),
  positions consecutive (or its ``attention_mask`` input all ones over the past and the call, when its
  metadata names one), calls longer than its prefill chunk split; ``past``: an original past/present
  export, each ``present`` fed back as the next ``past``, the attention mask grown. Logits [B, L, V] of all
  calls saved as ``ID/logits``;
- ``perplexity``: summed negative log-likelihood of token windows [N, L] (window i predicts its tokens
  1…L−1 from 0…L−2; log-softmax in float64): ``driver`` ``oneshot`` runs each window at once, ``state``
  and ``past`` stream it ``chunk`` tokens per call from an empty cache.
- ``memory``: the model-attributable resident peak of opening ``model`` under ``settings`` with ``threads``
  (as ``lmc.core.runtime.open_bundle`` does: the C heap trimmed after the load when the settings ask) and
  running it: ``runs`` times on the feeds ``feeds`` names (zeros of every input's shape when none: the
  empty session), or, with a ``driver``, over the ``spans`` of ``tokens`` as ``decode`` does. One task per
  process: the peak is of the whole process. See "Resident memory" below.
Each task's session takes ``settings`` (a bundle's ``session_options.json`` form: SessionOptions
attributes, ``config_entries``, ``cpu_arena``) and ``optimize`` (false: every graph optimisation off).
Results: ``JOB_DIR/out.npz`` and ``JOB_DIR/result.json`` (per task: output names, or nll and count, or
``error``: the first line of what onnxruntime raised).

Resident memory under qemu-user. The emulator runs the guest in its own address space with guest address =
host address (guest_base 0, checked: the interpreter's mapping at the same address in both). qemu emulates
/proc/self/maps — the guest's mappings only — but /proc/self/smaps and /proc/self/status are the host
process's: they hold the emulator too (its binary, heap, translated-code buffer). So the guest's resident
bytes are the smaps ``Rss`` of the host mappings that lie within the ranges maps lists, and the emulator's
are the rest:
    guest = Σ_{host mapping m} Rss(m) · |m ∩ G| / |m|,   emulator = Σ_m Rss(m) − guest
(G: the union of the guest's ranges; a host mapping straddling G's border — none seen — is split in
proportion and reported as ``straddling``). On a host Python maps and smaps list the same ranges: guest is
all of it, emulator 0. The ``memory`` task's peak (``peak``): the largest guest sample a thread takes every
``interval`` seconds while the session loads and runs (onnxruntime releases the GIL while it works), and
once after the load and after the runs — a sample, so it misses what lives shorter than an interval (under
emulation a run of llama-code takes tens of seconds; on the host, where the same worker's VmHWM is exact,
the samples fall 1% short). Beside it, the process's VmHWM (reset after the imports: /proc/self/clear_refs)
less the emulator's resident bytes before the load (``hwm_high``: the emulator only grows past its size
then, so an upper bound) and after the runs (``hwm_low``: a lower bound only if the emulator's bytes never
shrink, and they do, by a few MB: the empty session's "lower bound" exceeds its samples by 4 MB). All above
the guest's resident
bytes after the imports.
"""

import ctypes
import gc
import json
import math
import os
import re
import sys
import threading
import time

if __name__ == "__main__" and len(sys.argv) == 3:
    sys.path.insert(0, sys.argv[1])

import numpy as np
import onnxruntime as ort

_arena = []      # the process-wide CPU arena's configuration, once registered


def session_options(settings, optimize=True):
    """SessionOptions from a ``session_options.json``-style dict (``trim_heap_after_load`` is memory only)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in settings.items():
        if key == "config_entries":
            for entry, text in value.items():
                opts.add_session_config_entry(entry, str(text))
        elif key == "cpu_arena":
            if not _arena:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({k: int(v) for k, v in value.items()}))
                _arena.append(value)
            opts.add_session_config_entry("session.use_env_allocators", "1")
        elif key != "trim_heap_after_load":
            setattr(opts, key, value)
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


def open_session(task, log_level=3):
    opts = session_options(task.get("settings", {}), task.get("optimize", True))
    opts.log_severity_level = log_level
    if task.get("threads"):
        opts.intra_op_num_threads = int(task["threads"])
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(task["model"], opts, providers=["CPUExecutionProvider"])


_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ", re.M)
_RANGE_OR_RSS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) |^Rss:\s+(\d+) kB", re.M)


def mapped_ranges(maps_text):
    """The (start, end) address ranges of a /proc/PID/maps text, merged where they touch, sorted."""
    merged = []
    for a, b in sorted((int(m.group(1), 16), int(m.group(2), 16)) for m in _RANGE.finditer(maps_text)):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [tuple(r) for r in merged]


def _overlap(ranges, a, b):
    """Bytes of [a, b) within the sorted, disjoint ``ranges``."""
    total = 0
    for ga, gb in ranges:
        if ga >= b:
            break
        if gb > a:
            total += min(b, gb) - max(a, ga)
    return total


_RANGE_NAMED = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+ *(.*)$|^Rss:\s+(\d+) kB", re.M)


def mapping_kind(name):
    """What a mapping named ``name`` (the path column of smaps) holds, as bench/bench_memory.py's ledger
    classes it (the guest's brk heap is an anonymous mapping of the host's)."""
    return ("onnxruntime code" if "onnxruntime" in name else "libraries" if ".so" in name else
            "anonymous" if not name or name == "[heap]" else
            "weights file" if name.endswith((".weights", ".data")) else "other")


def resident_split(maps_text, smaps_text, kinds=False):
    """{"guest", "emulator", "straddling"}: resident bytes (smaps Rss) of the host mappings within the ranges
    ``maps_text`` lists, of the others, and of those partly within (split in proportion into the first two);
    ``kinds``: also "kinds", the guest's bytes by ``mapping_kind`` of the host mapping's name."""
    guest_ranges = mapped_ranges(maps_text)
    guest = emulator = straddling = 0.0
    by_kind = {}
    start = end = None
    name = ""
    for m in (_RANGE_NAMED if kinds else _RANGE_OR_RSS).finditer(smaps_text):
        if m.group(1) is not None:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            name = m.group(3).strip() if kinds else ""
            continue
        rss = int(m.group(m.lastindex)) * 1024
        share = _overlap(guest_ranges, start, end) / (end - start) if end > start else 0.0
        guest += rss * share
        emulator += rss * (1.0 - share)
        if 0.0 < share < 1.0:
            straddling += rss
        if kinds and share:
            kind = mapping_kind(name)
            by_kind[kind] = by_kind.get(kind, 0) + int(rss * share)
    out = {"guest": int(guest), "emulator": int(round(emulator)), "straddling": int(straddling)}
    if kinds:
        out["kinds"] = by_kind
    return out


def _read(path):
    with open(path) as f:
        return f.read()


def resident(kinds=False, attempts=5):
    """This process's resident bytes split into the guest's and the emulator's (``resident_split``), from a
    smaps read between two reads of maps that list the same guest ranges (a range the guest released while
    smaps was read could meanwhile hold the emulator's memory): up to ``attempts`` tries, "retries" says
    how many it took beyond the first."""
    maps_text = _read("/proc/self/maps")
    for attempt in range(attempts):
        smaps_text = _read("/proc/self/smaps")
        again = _read("/proc/self/maps")
        if again == maps_text or mapped_ranges(again) == mapped_ranges(maps_text):
            break
        maps_text = again
    return {**resident_split(maps_text, smaps_text, kinds), "retries": attempt}


class StderrLog:
    """onnxruntime's log at verbose level, what the C++ side writes to fd 2, captured to ``path``."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.close(fd)
        ort.set_default_logger_severity(0)
        return self

    def __exit__(self, *exc):
        ort.set_default_logger_severity(3)
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)

    def reserved(self):
        """Bytes the CPU arena reserved while the log was captured (the prepacked weight copies at load)."""
        with open(self.path, errors="replace") as f:
            return sum(int(n) for n in re.findall(r"Reserving memory in BFCArena for Cpu size: (\d+)", f.read()))


def status_bytes(field):
    """A /proc/self/status memory field (``VmHWM``, ``VmRSS``) in bytes; 0 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0]) * 1024
    return 0


def reset_peak():
    """Reset VmHWM to the current resident size (Linux's clear_refs 5); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap():
    """``lmc.core.weights.release_freed``: collect cycles, hand the C heap's free pages back (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """A thread sampling the guest's resident bytes every ``interval`` seconds; ``peak``: the largest;
    ``timeline``: (seconds since the start, guest, emulator) of every sample when asked to keep it."""

    def __init__(self, interval, timeline=False):
        self.interval, self.peak, self.count, self.retries = interval, 0, 0, 0
        self.timeline = [] if timeline else None
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self):
        now = resident()
        with self._lock:
            self.peak = max(self.peak, now["guest"])
            self.count += 1
            self.retries += now["retries"]
            if self.timeline is not None:
                self.timeline.append((round(time.monotonic() - self._start, 3), now["guest"], now["emulator"]))

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


class StateDriver:
    """A generation bundle, its state in place (``lmc.compiler.drivers.StateDecoder``'s driving)."""

    def __init__(self, sess, info):
        self.sess, self.info = sess, info
        types = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
        self.state = {}
        for name, _ in info["state"]:
            kind, shape = types[name]
            dtype = np.float16 if "float16" in kind else np.int8 if "int8" in kind else np.float32
            self.state[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))
        self.binding = sess.io_binding()
        self.binding.bind_output(info["logits"])
        for src, dst in info["state"]:
            self.binding.bind_ortvalue_input(src, self.state[src])
            self.binding.bind_ortvalue_output(dst, self.state[src])
        self.length = 0

    def reset(self):
        for value in self.state.values():
            value.update_inplace(np.zeros(value.shape(), value.numpy().dtype))
        self.length = 0

    def forward(self, ids):
        chunk = self.info.get("prefill_chunk") or ids.shape[1]
        return np.concatenate([self._step(ids[:, i:i + chunk]) for i in range(0, ids.shape[1], chunk)], axis=1)

    def _step(self, ids):
        s = ids.shape[1]
        if self.length + s > self.info["context"]:
            raise ValueError(f"positions up to {self.length + s} beyond the bundle's context {self.info['context']}")
        self.binding.bind_cpu_input(self.info["input_ids"], np.ascontiguousarray(ids))
        if self.info.get("attention_mask"):     # positions derived in the graph from a mask over the whole past
            self.binding.bind_cpu_input(self.info["attention_mask"], np.ones((ids.shape[0], self.length + s), np.int64))
        else:
            positions = np.broadcast_to(np.arange(self.length, self.length + s, dtype=np.int64), ids.shape)
            self.binding.bind_cpu_input(self.info["position_ids"], np.ascontiguousarray(positions))
        self.binding.bind_output(self.info["logits"])
        self.sess.run_with_iobinding(self.binding)
        self.length += s
        return self.binding.get_outputs()[0].numpy()


class PastDriver:
    """An original past/present export (``lmc.compiler.drivers.PastDecoder``'s driving)."""

    def __init__(self, sess, batch):
        self.sess, self.batch = sess, batch
        self.inputs = {i.name: i for i in sess.get_inputs()}
        outputs = [o.name for o in sess.get_outputs()]
        self.pairs = {n: n.replace("past_key_values", "present") for n in self.inputs
                      if n.startswith("past") and n.replace("past_key_values", "present") in outputs}
        self.logits = next(o for o in outputs if o not in self.pairs.values())
        self.reset()

    def reset(self):
        self.past = {n: np.zeros((self.batch, int(self.inputs[n].shape[1]), 0, int(self.inputs[n].shape[3])),
                                 np.float32) for n in self.pairs}
        self.length = 0

    def forward(self, ids):
        s = ids.shape[1]
        feeds = {"input_ids": ids}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((self.batch, self.length + s), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(self.length, self.length + s, dtype=np.int64),
                                                    ids.shape).copy()
        feeds.update(self.past)
        values = self.sess.run([self.logits] + list(self.pairs.values()), feeds)
        self.past = dict(zip(self.pairs, values[1:]))
        self.length += s
        return values[0]


def driver(task, sess):
    if task["driver"] == "state":
        return StateDriver(sess, task["info"])
    return PastDriver(sess, int(task.get("batch", 1)))


def window_nll(logits, window):
    """Summed −log p[target] of one window's predictions (logits [L, V])."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    targets = window[1:]
    return float(-lp[np.arange(targets.size), targets].sum())


def run_memory(task, arrays):
    """The ``memory`` task (see the module docstring): peaks in bytes above the guest's resident after the
    imports, and the emulator's resident bytes before and after."""
    prefix = task["feeds"] + "/" if task.get("feeds") else None
    feeds = {k.split("/", 1)[1]: v for k, v in arrays.items() if prefix and k.startswith(prefix)}
    ledger = bool(task.get("ledger"))
    gc.collect()
    hwm_reset = reset_peak()
    before = resident(ledger)
    prepacked = None
    with PeakSampler(float(task.get("interval", 0.05)), bool(task.get("timeline"))) as sampler:
        if task.get("log"):         # the prepacked copies, from onnxruntime's verbose log of the load
            with StderrLog(task["log"]) as log:
                sess = open_session(task, log_level=0)
            prepacked = log.reserved()
        else:
            sess = open_session(task)
        if task.get("settings", {}).get("trim_heap_after_load"):
            trim_heap()
        loaded = resident(ledger)
        sampler.sample()
        if task.get("driver"):
            d, tokens = driver(task, sess), arrays[task["tokens"]].astype(np.int64)
            for a, b in task["spans"]:
                d.forward(tokens[:, a:b])
        else:
            inputs = {i.name: i for i in sess.get_inputs()}
            if not feeds:
                feeds = {n: np.zeros([1] * len(i.shape), np.float32) for n, i in inputs.items()}
            for _ in range(int(task.get("runs", 2))):
                sess.run(None, {k: v for k, v in feeds.items() if k in inputs})
    after = resident(ledger)
    hwm, base = status_bytes("VmHWM"), before["guest"]
    result = {"peak": sampler.peak - base,
              "hwm_low": hwm - after["emulator"] - base, "hwm_high": hwm - before["emulator"] - base,
              "hwm_reset": hwm_reset, "samples": sampler.count, "retries": sampler.retries, "base": base,
              "emulator_before": before["emulator"], "emulator_after": after["emulator"],
              "straddling": max(before["straddling"], after["straddling"])}
    if ledger:      # the guest's resident bytes by kind: what the load added, what the runs added
        for phase, (a, b) in (("load", (before, loaded)), ("run", (loaded, after))):
            result[phase] = {k: b["kinds"].get(k, 0) - a["kinds"].get(k, 0) for k in set(a["kinds"]) | set(b["kinds"])}
    if prepacked is not None:
        result["prepacked"] = prepacked
    if sampler.timeline is not None:
        result["timeline"] = sampler.timeline
    return result


def run_task(task, arrays, out):
    if task["kind"] == "memory":
        return run_memory(task, arrays)
    sess = open_session(task)
    kind, tid = task["kind"], task["id"]
    if kind == "run":
        names = task.get("outputs") or [o.name for o in sess.get_outputs()]
        inputs = {i.name for i in sess.get_inputs()}
        for s, prefix in enumerate(task["feeds"]):
            feed = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
            for name, value in zip(names, sess.run(names, {k: v for k, v in feed.items() if k in inputs})):
                out[f"{tid}/{s}/{name}"] = value
        return {"outputs": names}
    if kind == "decode":
        tokens = arrays[task["tokens"]].astype(np.int64)
        d = driver(task, sess)
        out[f"{tid}/logits"] = np.concatenate([d.forward(tokens[:, a:b]) for a, b in task["spans"]], axis=1)
        return {}
    if kind == "perplexity":
        windows = arrays[task["windows"]].astype(np.int64)
        total, count = 0.0, 0
        if task["driver"] == "oneshot":
            name = sess.get_inputs()[0].name
            for w in windows:
                total += window_nll(sess.run(None, {name: w[None, :]})[0][0], w)
                count += w.size - 1
        else:
            d, chunk = driver(task, sess), int(task.get("chunk", 1))
            for w in windows:
                d.reset()
                logits = np.concatenate([d.forward(w[None, i:i + chunk])[0] for i in range(0, w.size, chunk)])
                total += window_nll(logits, w)
                count += w.size - 1
        return {"nll": total, "count": count, "perplexity": math.exp(total / count)}
    raise ValueError(f"unknown task kind {kind!r}")


def main(job_dir):
    with open(f"{job_dir}/job.json") as f:
        job = json.load(f)
    arrays = dict(np.load(f"{job_dir}/in.npz", allow_pickle=False)) if job.get("inputs") else {}
    out, results = {}, []
    for task in job["tasks"]:
        try:
            results.append(run_task(task, arrays, out))
        except Exception as exc:  # reported per task: the host decides what a failure means
            text = str(exc).strip()
            results.append({"error": f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"})
    np.savez(f"{job_dir}/out.npz", **out)
    import platform

    with open(f"{job_dir}/result.json", "w") as f:
        json.dump({"machine": platform.machine(), "onnxruntime": ort.__version__, "tasks": results}, f)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: target_worker.py SITE_PACKAGES JOB_DIR")
    ort.set_default_logger_severity(3)
    main(sys.argv[2])
