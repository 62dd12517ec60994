"""onnxruntime sessions as lmc opens them: CPU provider, quiet logs, optional thread count, optimizations
on or off, and a low-memory mode without weight prepacking; bundles under their ``session_options.json``.

A bundle's ``session_options.json`` — the target's ``[runtime.session_options]`` with the per-bundle
choice its build made from what the bundle holds (``[[runtime.choices]]``, ``lmc.targets.runtime_model``;
e.g. MatMulNBits' accuracy level) — holds onnxruntime ``SessionOptions`` attributes by name, plus
- ``config_entries``: ``{key: value}`` for ``add_session_config_entry``;
- ``cpu_arena``: an ``OrtArenaCfg`` (``arena_extend_strategy``, ``initial_chunk_size_bytes``, …) for one
  process-wide CPU arena (``onnxruntime.create_and_register_allocator``) that the session allocates from
  (``session.use_env_allocators``). A session's own arena grows by doubling chunks (1, 2, 4, 8 MiB, …),
  each of them touched from its start; one initial chunk large enough for the run is touched only up to
  the highest offset in use. It is registered once per process: the first configuration wins;
- ``trim_heap_after_load``: once the session exists, return the C heap's free pages to the system (glibc
  ``malloc_trim``; nothing where the C library has none): loading frees the optimiser's temporaries into
  holes the heap keeps resident, and runs allocate from the arena, not from them;
- ``release_mapped_after_load``: drop from the process the mapped pages of the tensors a kernel packed at
  load but whose originals the runtime keeps, never to read them again (``packed_and_kept``: onnxruntime's
  x86 MatMulNBits at accuracy level 4 keeps its scales and zero points; ``weights.drop_mapped_pages``) —
  every ``RELEASE_EVERY`` seconds while the session loads, and once it exists. A page read anyway comes
  back from the file.
``open_bundle`` applies all of it; a driver that creates its session itself calls
``apply_session_options`` before and creates it inside ``loading``.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnxruntime as ort

from lmc.core import ir, weights

class Int8Products(enum.Enum):
    """How the runtime's integer GEMM multiplies int8 activations by int8 weights on an ISA.

    ``EXACT``: every product and its sum reach an int32 accumulator (Arm SDOT/UDOT or widening multiplies;
    x86 VNNI's VPDPBUSD). ``SATURATING_PAIRS``: x86 AVX2 without VNNI, where onnxruntime shifts the
    activations to uint8 and VPMADDUBSW adds each pair of u8 × s8 products in int16, saturating at ±32767 —
    exact only when |w| ≤ 63 (2 · 255 · 63 = 32130)."""
    EXACT = "exact"
    SATURATING_PAIRS = "saturating-pairs"


SESSION_OPTIONS_FILE = "session_options.json"
CONFIG_ENTRIES = "config_entries"
CPU_ARENA = "cpu_arena"
TRIM_HEAP = "trim_heap_after_load"
RELEASE_MAPPED = "release_mapped_after_load"
USE_ENV_ALLOCATORS = "session.use_env_allocators"

log = logging.getLogger(__name__)
_process_arena: dict | None = None


def apply_session_options(opts: ort.SessionOptions, settings: dict) -> ort.SessionOptions:
    """Apply a bundle's ``session_options.json`` (see the module docstring) to ``opts``."""
    for key, value in settings.items():
        if key == CONFIG_ENTRIES:
            for entry, text in value.items():
                opts.add_session_config_entry(entry, str(text))
        elif key == CPU_ARENA:
            if use_process_arena(value):
                opts.add_session_config_entry(USE_ENV_ALLOCATORS, "1")
        elif key in (TRIM_HEAP, RELEASE_MAPPED):
            continue                 # once the session exists: ``after_load``
        else:
            setattr(opts, key, value)
    return opts


def use_process_arena(config: dict) -> bool:
    """Register the process-wide CPU arena with ``config`` (OrtArenaCfg keys) unless one is registered;
    True when sessions can allocate from it."""
    global _process_arena
    if _process_arena is None:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({k: int(v) for k, v in config.items()}))
        except Exception as exc:  # noqa: BLE001 — e.g. the embedding application registered its own
            log.debug("process-wide CPU arena not registered: %s", exc)
            return False
        _process_arena = dict(config)
    elif _process_arena != config:
        log.debug("process-wide CPU arena already registered as %s; %s not applied", _process_arena, config)
    return True


def after_load(settings: dict, model_path: str | Path | None = None,
               spans: dict[str, list[tuple[int, int]]] | None = None) -> None:
    """What ``session_options.json`` asks for once the session on ``model_path`` exists
    (``trim_heap_after_load``, ``release_mapped_after_load``; ``spans``: ``_released_spans``' answer, when
    the caller has it)."""
    spans = _released_spans(settings, model_path) if spans is None else spans
    if spans:
        dropped = weights.drop_mapped_pages(Path(model_path).parent, spans)
        log.debug("%.1f MiB of mapped weight pages dropped after load", dropped / 2**20)
    if settings.get(TRIM_HEAP):          # last: reading model.onnx above left heap behind too
        weights.release_freed()


RELEASE_EVERY = 0.02   # seconds between releases while a session loads
WATCH_MIN_BYTES = 64 << 20   # bundles whose weights files hold less are released after the load only


@contextlib.contextmanager
def loading(settings: dict, model_path: str | Path) -> Iterator[None]:
    """Create the session on ``model_path`` inside this; ``after_load`` follows once it exists. With
    ``release_mapped_after_load`` a thread also releases the packed-and-kept pages every ``RELEASE_EVERY``
    seconds while onnxruntime loads a bundle of ``WATCH_MIN_BYTES`` or more of weights (it runs without
    Python's lock meanwhile): the scales of the products packed so far leave as the load goes on instead of
    adding up to its peak — on the 1.1B-shaped int4 bundle 988 → 873 MiB of peak resident set, the same
    849 MiB once loaded. Releasing during the load is safe for the reason it is afterwards: the runtime never
    writes those mappings (a page written since it was mapped is left alone) and a page read again comes
    back from the file."""
    # a small bundle loads in a moment and keeps a few MiB: its graph is read once the session exists, as
    # before — read now, its parse would stand under the session's load (+3% of a 3 MB bundle's peak)
    spans = _released_spans(settings, model_path, WATCH_MIN_BYTES)
    stop = threading.Event()
    watcher = None
    if spans:
        folder = Path(model_path).parent

        def release() -> None:
            while not stop.wait(RELEASE_EVERY):
                weights.drop_mapped_pages(folder, spans)
        watcher = threading.Thread(target=release, name="lmc-release-mapped", daemon=True)
        watcher.start()
    try:
        yield
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    after_load(settings, model_path, spans)


def _released_spans(settings: dict, model_path: str | Path | None,
                    min_bytes: int = 1) -> dict[str, list[tuple[int, int]]] | None:
    """``packed_and_kept`` of the bundle when its settings ask for ``release_mapped_after_load`` and its
    weights are in a file; else none. None (not read yet) when that file holds under ``min_bytes``."""
    if not settings.get(RELEASE_MAPPED) or model_path is None:
        return {}
    size = _weights_bytes(model_path)
    if not size:
        return {}
    return packed_and_kept(model_path) if size >= min_bytes else None


def _weights_bytes(model_path: str | Path) -> int:
    """The bytes of the external-data files beside a bundle's model (none: its weights are inline, nothing
    is mapped)."""
    return sum(p.stat().st_size for p in Path(model_path).parent.glob("*.weights"))


def packed_and_kept(model_path: str | Path) -> dict[str, list[tuple[int, int]]]:
    """External-data spans (``{file: [(offset, length)]}``) of the tensors onnxruntime's x86 MatMulNBits
    packs into its weight at load yet keeps: the scales and zero points of a node at accuracy level 4 (its
    int8 kernel reads the packed copies only); in a subgraph also its data, unless another node reads it
    (onnxruntime releases a main-graph node's, not a subgraph's: 3.1 MB of a greedy head's table on
    llama-code)."""
    model = onnx.load(str(model_path), load_external_data=False)
    graphs = ir.proto_graphs(model.graph)
    nodes = [n for g in graphs for n in g.node]
    nested = {id(n) for g in graphs[1:] for n in g.node}
    external = {t.name: {e.key: e.value for e in t.external_data} for g in graphs for t in g.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    readers: dict[str, int] = {}
    for node in nodes:
        for name in set(node.input):
            readers[name] = readers.get(name, 0) + 1
    spans: dict[str, list[tuple[int, int]]] = {}
    for node in nodes:
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or level != 4:
            continue
        data = id(node) in nested and readers.get(node.input[1]) == 1
        for name in node.input[1 if data else 2:4]:
            info = external.get(name)
            if info is not None and "length" in info:
                spans.setdefault(info["location"], []).append((int(info.get("offset", 0)), int(info["length"])))
    return spans


def bundle_session_options(model_path: str | Path) -> dict:
    """The session options a bundle's plan assumes (empty for a model lmc did not build)."""
    path = Path(model_path).parent / SESSION_OPTIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# onnxruntime's severity for lmc's sessions: fatal only. Its errors reach lmc as exceptions, which lmc reports
# in one line; at 3 (errors) onnxruntime would also print them itself, in colour, ahead of that line.
ORT_LOG_LEVEL = 4


def open_bundle(model_path: str | Path, threads: int = 0, settings: dict | None = None,
                log_level: int = ORT_LOG_LEVEL) -> ort.InferenceSession:
    """An onnxruntime CPU session on a bundle under its ``session_options.json`` (or ``settings``): the
    configuration its plan's runtime prediction describes."""
    settings = bundle_session_options(model_path) if settings is None else settings
    opts = ort.SessionOptions()
    opts.log_severity_level = log_level
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    apply_session_options(opts, settings)
    with loading(settings, model_path):
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return sess


def session(model: str | Path | bytes | onnx.ModelProto, threads: int = 0, optimize: bool = True,
            low_memory: bool = False, log_level: int = ORT_LOG_LEVEL,
            config_entries: dict[str, str] | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``low_memory`` turns weight prepacking off (no second copy of the
    weights; used for verification, where speed matters less than fitting); ``config_entries`` are added
    with ``add_session_config_entry`` (a bundle's own, so that checks compute what the bundle computes)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = log_level
    for entry, text in (config_entries or {}).items():
        opts.add_session_config_entry(entry, str(text))
    if low_memory:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto):
        try:
            size = model.ByteSize()
        except Exception:  # protobuf's EncodeError: the message is over 2 GiB
            size = PROTOBUF_LIMIT + 1
        if size > PROTOBUF_LIMIT or weights.file_backed(model):
            return _session_via_file(model, opts)
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


PROTOBUF_LIMIT = (2 << 30) - (64 << 20)      # one protobuf message holds at most 2 GiB


def _session_via_file(model: onnx.ModelProto, opts: ort.SessionOptions) -> ort.InferenceSession:
    """A session on a model too large for one protobuf, or whose weights are still in the files it was
    loaded from: written to a temporary folder (removed once onnxruntime has read it) with its in-memory
    weights as external data and its file-backed ones linked there (``weights.link_external``), so
    onnxruntime maps them instead of lmc copying them."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmc-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        linked = weights.link_external(model, Path(tmp))
        try:
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location="model.data", size_threshold=1024)
        finally:
            weights.restore_external(linked)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
