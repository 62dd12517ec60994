"""Checks on the target's instruction set: ``lmc verify BUNDLE --against MODEL --on aarch64``.

The bundle and the original both run on the instruction set the bundle was built for — an arm64 onnxruntime
(the host's version) under qemu-user, ``qemu-aarch64-static -L ROOT -cpu CPU ROOT/usr/bin/python3``, with
CPU the target's ``isa.emulator_cpu`` (read from the bundle's ``plan.json`` target) — on the inputs the host
check uses (``lmc.compiler.verify``: the same seeded random feeds or ``--inputs``, the same generation spans
and tokens), and are judged as there: every output's max relative error within max(tolerance, 2 × the
original's own spread, measured on the target too) for one-shot bundles, the plain tolerance per logits
call kind and the perplexity gap for generation bundles; exit 3 beyond. The report adds, per logits output,
top-1 agreement: the share of positions whose argmax is the original's. Unlike the host check, which turns
weight prepacking off to hold one copy of the weights, both models run as deployed — a bundle under its whole
``session_options.json`` — so the kernels checked are the device's: without prepacking, onnxruntime's
MatMulNBits dequantizes its weights and runs a float GEMM instead of its int8-activation kernel.

Both models run in one emulated process, ``target_worker.py`` (numpy and onnxruntime only, no lmc), one
session at a time; ``on="host"`` runs the same worker under the host's Python, for figures measured
the same way on both. The environment comes from ``scripts/setup-aarch64.sh`` (default
``~/.cache/lmc/aarch64``, or ``$LMC_AARCH64_ROOT``): an arm64 Debian root and the aarch64 wheels of
onnxruntime and numpy. onnxruntime's cpuinfo finds no CPU description there (the root's empty
``/sys/devices/system/cpu/possible``) and takes the emulated CPU's features from the auxiliary vector, as on
a device where cpuinfo fails: kernels are chosen by ISA features (dotprod, fp16, i8mm), not by core.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lmc.core.errors import LmcError
from lmc.core.metadata import build_metadata, decode_input_values
from lmc.core.perplexity import load_tokens
from lmc.core.runtime import bundle_session_options
from lmc.compiler.drivers import generation_info
from lmc.compiler.on_board import verify_on_board
from lmc.compiler.seq2seq_generate import seq2seq_info
from lmc.compiler.verify import (DEFAULT_TOLERANCE, SPREAD_FACTOR, OutputError, VerifyReport, bundle_model_path,
                                 check_spans, compare, load_inputs, output_tolerance, random_inputs, with_values)
from lmc.targets.cbundle.board import board_targets
from lmc.targets.target import load_target

log = logging.getLogger(__name__)

ENV_VAR = "LMC_AARCH64_ROOT"
SETUP = "scripts/setup-aarch64.sh"
PLATFORMS = ("aarch64",)
WORKER = Path(__file__).with_name("target_worker.py")


def environment_dir() -> Path:
    """Where ``scripts/setup-aarch64.sh`` prepares the environment: ``$LMC_AARCH64_ROOT`` or
    ``~/.cache/lmc/aarch64``."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "lmc" / "aarch64")


@dataclass(frozen=True)
class Emulator:
    """qemu-user running the arm64 root's Python as one CPU model."""

    qemu: str
    root: Path
    site: Path
    cpu: str

    def command(self) -> list[str]:
        return [self.qemu, "-L", str(self.root), "-cpu", self.cpu, str(self.root / "usr/bin/python3"), "-I"]


def find_emulator(cpu: str, directory: str | Path | None = None) -> Emulator:
    """The environment ``scripts/setup-aarch64.sh`` prepared (its ``ready`` file), for ``cpu``; LmcError
    naming the script when it is missing or was prepared for another onnxruntime version."""
    import onnxruntime

    d = Path(directory) if directory is not None else environment_dir()
    ready = d / "ready"
    hint = f"run {SETUP}{'' if directory is None else ' ' + str(d)} once"
    if not ready.is_file():
        raise LmcError(f"no aarch64 environment at {d}: {hint} (it installs qemu-user-static and debootstrap, "
                       f"needs root and about 2 minutes; {ENV_VAR} names another folder)")
    lines = ready.read_text().splitlines()
    fields = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    want = f"onnxruntime=={onnxruntime.__version__}"
    if not lines or want not in lines[0].split():
        raise LmcError(f"the aarch64 environment at {d} holds {lines[0] if lines else 'nothing'}, not {want}: {hint}")
    emulator = Emulator(fields.get("qemu", ""), Path(fields.get("root", d / "root")),
                        Path(fields.get("site", d / "root/opt/lmc/site-packages")), cpu)
    if not (shutil.which(emulator.qemu) and (emulator.root / "usr/bin/python3").exists() and emulator.site.is_dir()):
        raise LmcError(f"the aarch64 environment at {d} is incomplete: {hint}")
    return emulator


def _task_key(task: dict, arrays: dict[str, np.ndarray], emulator: Emulator | None) -> str:
    """What a task's results depend on: the task, the model file's identity, the input arrays it reads and
    the machine."""
    import hashlib

    h = hashlib.sha256(json.dumps([task, emulator.cpu if emulator else "host"], sort_keys=True).encode())
    for path in (Path(task["model"]), Path(task["model"]).with_name("model.weights")):
        if path.exists():
            st = path.stat()
            h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    names = [task[k] for k in ("tokens", "windows") if k in task]
    prefixes = tuple(f + "/" for f in task.get("feeds", ()))
    for name in sorted(k for k in arrays if k in names or (prefixes and k.startswith(prefixes))):
        h.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def run_worker(tasks: list[dict], arrays: dict[str, np.ndarray], emulator: Emulator | None = None,
               cache: dict | None = None) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """Run ``tasks`` (see ``target_worker``) in one worker process — emulated, or the host's Python when
    ``emulator`` is None — and return (per-task results, output arrays, {machine, onnxruntime}).
    ``cache`` (a dict the caller keeps): tasks run before on the same model, inputs and machine are taken
    from it, the others added as (task, result, outputs, machine) — for checking several bundles against
    one original."""
    keys = [_task_key(t, arrays, emulator) for t in tasks] if cache is not None else [None] * len(tasks)
    todo = [t for t, k in zip(tasks, keys) if k is None or k not in cache]
    results, outputs, machine = _run_worker(todo, arrays, emulator) if todo else ([], {}, {})
    fresh = dict(zip((id(t) for t in todo), results))
    merged, merged_outputs = [], {}
    for task, key in zip(tasks, keys):
        prefix = task["id"] + "/"
        if id(task) in fresh:
            result, own = fresh[id(task)], {k: v for k, v in outputs.items() if k.startswith(prefix)}
            if key is not None and "error" not in result:
                cache[key] = (task, result, own, machine)
        else:
            _, result, own, cached_machine = cache[key]
            machine = machine or cached_machine
        merged.append(result)
        merged_outputs.update(own)
    return merged, merged_outputs, machine


def _run_worker(tasks, arrays, emulator):
    with tempfile.TemporaryDirectory(prefix="lmc-on-target-") as tmp:
        job = Path(tmp)
        if arrays:
            np.savez(job / "in.npz", **arrays)
        (job / "job.json").write_text(json.dumps({"tasks": tasks, "inputs": bool(arrays)}))
        if emulator is None:
            command, site = [sys.executable, "-I"], str(Path(np.__file__).parents[1])
        else:
            command, site = emulator.command(), str(emulator.site)
        proc = subprocess.run([*command, str(WORKER), site, str(job)], capture_output=True, text=True)
        noise = ("Error in cpuinfo", "onnxruntime warning: cpuinfo_initialize")
        stderr = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(noise)]
        if proc.returncode != 0 or not (job / "result.json").is_file():
            where = f"under {Path(command[0]).name} -cpu {emulator.cpu}" if emulator else "on the host"
            raise LmcError(f"the check's worker failed {where} (exit {proc.returncode}): "
                           f"{stderr[-1] if stderr else 'no message'}")
        if stderr:
            log.debug("worker stderr:\n%s", "\n".join(stderr))
        result = json.loads((job / "result.json").read_text())
        with np.load(job / "out.npz", allow_pickle=False) as out:
            outputs = {k: out[k] for k in out.files}
    return result.pop("tasks"), outputs, result


@dataclass(frozen=True)
class OnTargetReport(VerifyReport):
    """A ``VerifyReport`` measured on ``machine`` (``emulator_cpu``: qemu's CPU model, "" on the host), with
    top-1 agreement per logits output: (positions whose argmax equals the original's, positions)."""

    machine: str = ""
    emulator_cpu: str = ""
    top1: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def details(self) -> tuple[str, ...]:
        """Lines the CLI prints after the outputs: where it ran and the top-1 agreement."""
        where = f"{self.machine} (qemu-user -cpu {self.emulator_cpu})" if self.emulator_cpu else self.machine
        lines = [f"ran on {where}"]
        lines += [f"{name}: top-1 agreement {a}/{n} ({a / n:.1%})" for name, (a, n) in self.top1.items() if n]
        return tuple(lines)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "machine": self.machine, "emulator_cpu": self.emulator_cpu,
                "top1": {k: {"agree": a, "positions": n, "rate": a / n if n else None}
                         for k, (a, n) in self.top1.items()}}


def _target_cpu(model_path: Path) -> tuple[str, str]:
    """(target name, its emulator CPU) of a bundle, from ``plan.json`` (else the model's lmc metadata)."""
    plan = model_path.parent / "plan.json"
    name = json.loads(plan.read_text()).get("target") if plan.is_file() else None
    name = name or build_metadata(onnx.load(str(model_path), load_external_data=False)).get("target")
    if not name:
        raise LmcError(f"{model_path}: no plan.json or lmc metadata names the bundle's target")
    target = load_target(name)
    if not target.isa.emulator_cpu:
        raise LmcError(f"target {name} ({target.isa.arch}) names no emulator CPU (isa.emulator_cpu): --on aarch64 "
                       "runs bundles built for an arm64 target such as cortex-a55")
    return name, target.isa.emulator_cpu


def _top1(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, int]:
    r, c = np.asarray(reference), np.asarray(candidate)
    if r.ndim < 2 or r.shape[-1] < 2 or r.shape != c.shape:
        return 0, 0
    agree = np.argmax(r, axis=-1) == np.argmax(c, axis=-1)
    return int(agree.sum()), int(agree.size)


def _failed(result: dict, what: str) -> None:
    if "error" in result:
        raise LmcError(f"onnxruntime could not run {what} on the target: {result['error']}")


def verify_on(bundle: str | Path, against: str | Path, on: str = "aarch64", inputs: str | Path | None = None,
              tolerance: float = DEFAULT_TOLERANCE, samples: int = 1, seed: int = 0,
              tokens: str | Path | None = None, seq_len: int = 256, windows: int = 64,
              cache: dict | None = None) -> OnTargetReport:
    """``lmc.compiler.verify.verify`` with both models run on ``on`` ("aarch64": under the bundle's
    target's emulator CPU; "host": this machine, through the same worker); ``cache``: see ``run_worker``.
    A microcontroller target with a board (``cortex-m55``, ``cortex-m7``): the C bundle runs on that board
    (``lmc.compiler.on_board``)."""
    if on in board_targets():
        if tokens is not None:
            raise LmcError(f"--tokens applies to language models; on {on} a C bundle is checked on inputs")
        return verify_on_board(bundle, against, on, inputs, tolerance, samples, seed)
    model_path = bundle_model_path(bundle)
    if seq2seq_info(model_path) is not None:
        raise LmcError("--on applies to one-shot and generation bundles, not encoder–decoder bundles")
    if not os.path.isfile(against):
        raise LmcError(f"{against}: no such file")
    if on == "host":
        emulator = None
    elif on in PLATFORMS:
        cpu = _target_cpu(model_path)[1]
        emulator = find_emulator(cpu)
    else:
        raise LmcError(f"--on {on}: expected host or one of {', '.join(PLATFORMS + board_targets())}")
    info = generation_info(model_path)
    if info is not None:
        return _verify_generation(model_path, Path(against), info, emulator, tolerance, seed, tokens, seq_len,
                                  windows, cache)
    return _verify_oneshot(model_path, Path(against), emulator, inputs, tolerance, samples, seed, tokens, seq_len,
                           windows, cache)


def session_settings(model_path: str | Path) -> dict:
    """What a model runs under here: a bundle's whole ``session_options.json``, as deployed — weight
    prepacking on, so MatMulNBits runs the kernel it packs for (int8 activations at accuracy level 4);
    with prepacking off, as the host check runs to hold one copy of the weights, it dequantizes the weights
    and runs a float GEMM instead."""
    return bundle_session_options(model_path)


def _verify_oneshot(model_path, against, emulator, inputs, tolerance, samples, seed, tokens, seq_len, windows,
                    cache=None) -> OnTargetReport:
    bundle_model = onnx.load(str(model_path), load_external_data=False)
    if inputs is not None:
        feeds = load_inputs(inputs, {i.name: len(i.type.tensor_type.shape.dim) for i in bundle_model.graph.input})
    else:
        shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in bundle_model.graph.input}
        feeds = random_inputs(model_path, shapes, samples=samples, seed=seed)
    try:
        fixed = decode_input_values(build_metadata(bundle_model).get("input_values", ""))
    except ValueError as exc:
        raise LmcError(f"{model_path}: unreadable lmc.input_values metadata ({exc})") from exc
    ref_feeds = with_values(against, feeds, fixed) if fixed else feeds
    if any(v.dtype.kind in "OSU" for f in ref_feeds for v in f.values()):
        raise LmcError("--on runs numeric inputs only (this model takes strings)")
    arrays = {f"ref{i}/{k}": v for i, f in enumerate(ref_feeds) for k, v in f.items()}
    arrays.update({f"cand{i}/{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    ref_settings = session_settings(against)
    names = [o.name for o in bundle_model.graph.output]
    tasks = [{"kind": "run", "id": "ref", "model": str(against), "settings": ref_settings,
              "feeds": [f"ref{i}" for i in range(len(feeds))], "outputs": names},
             {"kind": "run", "id": "plain", "model": str(against), "settings": ref_settings, "optimize": False,
              "feeds": [f"ref{i}" for i in range(len(feeds))], "outputs": names},
             {"kind": "run", "id": "cand", "model": str(model_path), "settings": session_settings(model_path),
              "feeds": [f"cand{i}" for i in range(len(feeds))], "outputs": names}]
    if tokens is not None:
        arrays["windows"] = load_tokens(tokens, seq_len, windows)
        tasks += [{"kind": "perplexity", "id": f"ppl-{who}", "model": str(path), "driver": "oneshot",
                   "windows": "windows", "settings": session_settings(path)}
                  for who, path in (("ref", against), ("cand", model_path))]
    results, out, machine = run_worker(tasks, arrays, emulator, cache)
    _failed(results[0], str(against))
    _failed(results[2], "the bundle")
    worst: dict[str, OutputError] = {}
    plain: dict[str, float] = {}
    top1: dict[str, tuple[int, int]] = {}
    for s in range(len(feeds)):
        for name in names:
            r, c = out[f"ref/{s}/{name}"], out[f"cand/{s}/{name}"]
            err = compare(r, c, name)
            if name not in worst or err.max_rel > worst[name].max_rel:
                worst[name] = err
            if "error" not in results[1]:
                p = compare(r, out[f"plain/{s}/{name}"], name).max_rel
                plain[name] = max(plain.get(name, 0.0), p)
            if "logits" in name:
                a, n = _top1(r, c)
                prev = top1.get(name, (0, 0))
                top1[name] = (prev[0] + a, prev[1] + n)
    if "error" in results[1]:
        log.warning("could not measure the original's numerical spread on the target: %s", results[1]["error"])
    outputs = []
    for name in names:
        err, tol = worst[name], output_tolerance(tolerance, out[f"ref/0/{name}"].dtype)
        s = plain.get(name)
        allowed = max(tol, SPREAD_FACTOR * s) if s is not None and np.isfinite(s) else None
        outputs.append(OutputError(err.name, err.max_abs, err.max_rel, err.cosine,
                                   tol if tol != tolerance else None, s, allowed))
    ppl = {}
    if tokens is not None:
        _failed(results[3], str(against))
        _failed(results[4], "the bundle")
        ppl = {"original": results[3]["perplexity"], "bundle": results[4]["perplexity"]}
        ppl["relative_change"] = ppl["bundle"] / ppl["original"] - 1.0
    return OnTargetReport(tuple(outputs), len(feeds), tolerance, ppl, SPREAD_FACTOR, machine=machine["machine"],
                          emulator_cpu=emulator.cpu if emulator else "", top1=top1)


def worker_info(info) -> dict:
    """What the worker's ``state`` driver needs of a bundle's ``GenerationInfo``."""
    return {"context": info.context, "batch": info.batch, "input_ids": info.input_ids,
            "position_ids": info.position_ids, "logits": info.logits, "state": [list(p) for p in info.state],
            "prefill_chunk": info.prefill_chunk, "attention_mask": getattr(info, "attention_mask", "")}


def _verify_generation(model_path, against, info, emulator, tolerance, seed, tokens, seq_len, windows,
                       cache=None) -> OnTargetReport:
    model = onnx.load(str(model_path), load_external_data=False)
    vocab = next(o for o in model.graph.output if o.name == info.logits).type.tensor_type.shape.dim[-1].dim_value
    spans = check_spans(info)
    length = spans[-1][1]
    # the host check's tokens (compare_generation) and sessions (StateDecoder / PastDecoder)
    ids = np.random.default_rng(seed).integers(0, vocab, (info.batch, length)).astype(np.int64)
    state_info = worker_info(info)
    bundle_settings = bundle_session_options(model_path)
    arrays = {"ids": ids}
    tasks = [{"kind": "decode", "id": "ref", "model": str(against), "driver": "past", "batch": info.batch,
              "settings": session_settings(against), "tokens": "ids", "spans": spans},
             {"kind": "decode", "id": "cand", "model": str(model_path), "driver": "state", "info": state_info,
              "settings": bundle_settings, "tokens": "ids", "spans": spans}]
    if tokens is not None:
        window = min(seq_len, info.context) if not info.window else seq_len
        arrays["windows"] = load_tokens(tokens, window, windows)
        tasks += [{"kind": "perplexity", "id": "ppl-ref", "model": str(against), "driver": "past",
                   "windows": "windows", "chunk": window},
                  {"kind": "perplexity", "id": "ppl-cand", "model": str(model_path), "driver": "state",
                   "info": state_info, "settings": bundle_settings, "windows": "windows", "chunk": 1},
                  {"kind": "perplexity", "id": "ppl-stepped", "model": str(against), "driver": "past",
                   "windows": "windows", "chunk": 1}]
    results, out, machine = run_worker(tasks, arrays, emulator, cache)
    _failed(results[0], str(against))
    _failed(results[1], "the bundle")
    ref, cand = out["ref/logits"], out["cand/logits"]
    worst: dict[str, OutputError] = {}
    top1: dict[str, tuple[int, int]] = {}
    for a, b in spans:
        name = "logits (decode)" if b - a == 1 and a > 0 else "logits (prefill)"
        err = compare(ref[:, a:b], cand[:, a:b], name)
        if name not in worst or err.max_rel > worst[name].max_rel:
            worst[name] = err
        agree, n = _top1(ref[:, a:b], cand[:, a:b])
        prev = top1.get(name, (0, 0))
        top1[name] = (prev[0] + agree, prev[1] + n)
    names = [n for n in ("logits (prefill)", "logits (decode)") if n in worst]
    ppl = {}
    if tokens is not None:
        for r, what in zip(results[2:], (str(against), "the bundle", str(against))):
            _failed(r, what)
        original, bundle_ppl, stepped = (r["perplexity"] for r in results[2:])
        ppl = {"original": original, "bundle": bundle_ppl, "relative_change": bundle_ppl / original - 1.0,
               "spread": abs(stepped / original - 1.0)}
        ppl["allowed"] = max(tolerance, SPREAD_FACTOR * ppl["spread"])
    return OnTargetReport(tuple(worst[n] for n in names), len(spans), tolerance, ppl, SPREAD_FACTOR,
                          machine=machine["machine"], emulator_cpu=emulator.cpu if emulator else "",
                          top1={n: top1[n] for n in names})
