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
Each task's session takes ``settings`` (a bundle's ``session_options.json`` form: SessionOptions
attributes, ``config_entries``, ``cpu_arena``) and ``optimize`` (false: every graph optimisation off).
Results: ``JOB_DIR/out.npz`` and ``JOB_DIR/result.json`` (per task: output names, or nll and count, or
``error``: the first line of what onnxruntime raised).
"""

import json
import math
import sys

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


def open_session(task):
    return ort.InferenceSession(task["model"], session_options(task.get("settings", {}), task.get("optimize", True)),
                                providers=["CPUExecutionProvider"])


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


def run_task(task, arrays, out):
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
