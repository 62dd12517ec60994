"""An encoder–decoder export as optimum writes it (``main_export``, tasks ``*-with-past``): its files, its
config, and its own generation loop — the reference an encoder–decoder bundle is judged by.

A folder holds ``encoder_model.onnx`` and the decoder either as two files — ``decoder_model.onnx`` (no past:
computes the cross-attention keys/values from ``encoder_hidden_states`` and returns them as
``present.{i}.encoder.*``) and ``decoder_with_past_model.onnx`` (reads them as ``past_key_values.{i}.encoder.*``)
— or as one, ``decoder_model_merged.onnx``, whose ``If`` on ``use_cache_branch`` holds both (each is taken
by fixing that input and folding the ``If``). ``config.json`` and ``generation_config.json`` give the
decoder start and end tokens.

``OriginalLoop`` runs optimum's loop under onnxruntime: the encoder once per input; the decoder without past
on the prompt; then the decoder with past one step at a time, each ``present.*.decoder.*`` fed back as
``past_key_values.*.decoder.*`` and the first step's ``present.*.encoder.*`` as ``past_key_values.*.encoder.*``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.model_io import load_model
from lmc.core.pass_manager import PassContext
from lmc.core.runtime import ORT_LOG_LEVEL, apply_session_options
from lmc.passes.fold_constants import FoldConstants

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
WITH_PAST_FILE = "decoder_with_past_model.onnx"
MERGED_FILE = "decoder_model_merged.onnx"
CONFIG_FILES = ("config.json", "generation_config.json")
USE_CACHE = "use_cache_branch"
NAMES = (ENCODER_FILE, DECODER_FILE, WITH_PAST_FILE, MERGED_FILE)


@dataclass(frozen=True)
class Seq2SeqExport:
    """The files of one export: the encoder, and the decoder with and without past (two files, or one
    merged file serving both)."""

    folder: Path
    encoder: Path
    with_past: Path
    without_past: Path
    config: dict = field(default_factory=dict)

    @property
    def merged(self) -> bool:
        return self.with_past == self.without_past

    def token(self, key: str) -> int | None:
        value = self.config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return int(value) if isinstance(value, int) else None

    @property
    def decoder_start_token_id(self) -> int | None:
        return self.token("decoder_start_token_id")

    @property
    def max_positions(self) -> int | None:
        """The decoder's learned positions (Whisper's ``max_target_positions``); None: no such limit."""
        value = self.config.get("max_target_positions")
        return int(value) if isinstance(value, int) else None

    def with_past_graph(self) -> gs.Graph:
        """The decoder with past (a merged file's with-past branch; its dummy ``present.*.encoder.*``
        outputs and unread inputs dropped)."""
        graph = self._decoder(True)
        graph.outputs = [t for t in graph.outputs if ".encoder." not in t.name]
        return _drop_unread(graph)

    def without_past_graph(self) -> gs.Graph:
        return _drop_unread(self._decoder(False))

    def _decoder(self, past: bool) -> gs.Graph:
        path = self.with_past if past else self.without_past
        graph = ir.to_graph(load_model(path))
        if self.merged:
            _take_branch(graph, past, path)
        return graph


def _take_branch(graph: gs.Graph, past: bool, path: Path) -> None:
    if USE_CACHE not in {t.name for t in graph.inputs}:
        raise LmcError(f"{path}: a merged decoder without a '{USE_CACHE}' input; lmc cannot pick its branches")
    shapes.bind_input_values(graph, {USE_CACHE: np.array([past])})
    shapes.infer_shapes(graph)
    FoldConstants().run(graph, PassContext())
    ir.remove_dead_nodes(graph)
    if any(ir.is_op(n, "If") for n in graph.nodes):
        raise LmcError(f"{path}: '{USE_CACHE}' fixed, the decoder still has control flow; lmc cannot take "
                       f"its {'with' if past else 'without'}-past branch")


def _drop_unread(graph: gs.Graph) -> gs.Graph:
    read = {t.name for n in graph.nodes for t in ir.all_reads(n)} | ir.graph_outputs(graph)
    graph.inputs = [t for t in graph.inputs if t.name in read]
    return graph


def _read_config(folder: Path) -> dict:
    config: dict = {}
    for name in CONFIG_FILES:
        p = folder / name
        if p.is_file():
            try:
                config.update(json.loads(p.read_text()))
            except (OSError, ValueError) as exc:
                raise LmcError(f"{p}: unreadable ({exc})") from exc
    return config


def is_export_path(path: str | Path) -> bool:
    """Whether ``path`` names an encoder–decoder export: a folder, or one of optimum's encoder–decoder file
    names with ``encoder_model.onnx`` beside it."""
    p = Path(path)
    return p.is_dir() or (p.name in NAMES and (p.parent / ENCODER_FILE).is_file())


def is_export_build(path: str | Path, options) -> bool:
    """Whether ``lmc build`` of ``path`` with ``options`` is an encoder–decoder build: a folder (nothing
    else builds from one), ``--encoder-length``, or ``--context`` on one of an export's files."""
    return Path(path).is_dir() or getattr(options, "encoder_length", None) is not None or \
        (getattr(options, "context", None) is not None and is_export_path(path))


def find_export(path: str | Path) -> Seq2SeqExport:
    """The export at ``path`` (its folder, or one of its files: a decoder file given picks that decoder);
    LmcError saying what is missing."""
    p = Path(path)
    if not p.exists():
        raise LmcError(f"{path}: no such file or folder")
    folder = p if p.is_dir() else p.parent
    encoder = folder / ENCODER_FILE
    if not encoder.is_file():
        found = ", ".join(sorted(q.name for q in folder.glob("*.onnx"))) or "no .onnx files"
        raise LmcError(f"{folder}: no {ENCODER_FILE} (found {found}); --context takes a decoder exported with "
                       f"past key/values, or an encoder–decoder export folder as optimum writes it")
    have = {name: (folder / name).is_file() for name in NAMES}
    if p.name == MERGED_FILE or (p.is_dir() and not have[WITH_PAST_FILE] and have[MERGED_FILE]):
        return Seq2SeqExport(folder, encoder, folder / MERGED_FILE, folder / MERGED_FILE, _read_config(folder))
    if not have[WITH_PAST_FILE]:
        raise LmcError(f"{folder}: the encoder–decoder export has no decoder with past ({WITH_PAST_FILE} or "
                       f"{MERGED_FILE}); export it with a '-with-past' task, e.g. optimum's "
                       "text2text-generation-with-past")
    if have[DECODER_FILE]:
        without = folder / DECODER_FILE
    elif have[MERGED_FILE]:
        without = folder / MERGED_FILE
    else:
        raise LmcError(f"{folder}: {WITH_PAST_FILE} reads the cross-attention keys/values that {DECODER_FILE} "
                       f"computes, and neither it nor {MERGED_FILE} is there")
    return Seq2SeqExport(folder, encoder, folder / WITH_PAST_FILE, without, _read_config(folder))


# ---------------------------------------------------------------------------------------------------------
# the export's own loop


def _session(path: Path, session_options: dict | None = None):
    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_LOG_LEVEL
    apply_session_options(opts, session_options or {})
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OriginalLoop:
    """optimum's generation loop over an export, under onnxruntime (``forward(ids) -> logits`` and
    ``reset()``, as ``generate.greedy`` drives a decoder); ``encode(inputs)`` runs the encoder first."""

    def __init__(self, export: Seq2SeqExport, session_options: dict | None = None):
        self.export = export
        self.encoder = _session(export.encoder, session_options)
        self.first = _session(export.without_past, session_options)
        self.cached = self.first if export.merged else _session(export.with_past, session_options)
        self.fixed: dict[str, np.ndarray] = {}
        self.reset()

    def encode(self, inputs: dict[str, np.ndarray]) -> None:
        names = [i.name for i in self.encoder.get_inputs()]
        missing = [n for n in names if n not in inputs]
        if missing:
            raise LmcError(f"encoder inputs missing: {', '.join(missing)}")
        hidden = self.encoder.run(None, {n: inputs[n] for n in names})[0]
        self.fixed = {"encoder_hidden_states": hidden}
        if "attention_mask" in inputs:
            self.fixed["encoder_attention_mask"] = inputs["attention_mask"]
        self.reset()

    def reset(self) -> None:
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def _feeds(self, session, ids: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {}
        for i in session.get_inputs():
            if i.name == "input_ids":
                feeds[i.name] = ids
            elif i.name == USE_CACHE:
                feeds[i.name] = np.array([self.length > 0])
            elif i.name in self.past:
                feeds[i.name] = self.past[i.name]
            elif i.name in self.fixed:
                feeds[i.name] = self.fixed[i.name]
            elif i.name.startswith("past_key_values."):    # merged file, first step: its past is not read
                length = self.fixed["encoder_hidden_states"].shape[1] if ".encoder." in i.name else 0
                feeds[i.name] = np.zeros((ids.shape[0], int(i.shape[1]), length, int(i.shape[3])), np.float32)
            else:
                raise LmcError(f"{self.export.folder}: decoder input '{i.name}' is not one optimum's loop feeds")
        return feeds

    def forward(self, ids: np.ndarray) -> np.ndarray:
        if not self.fixed:
            raise LmcError("encode() the encoder's inputs before decoding")
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        session = self.cached if self.length else self.first
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(names, self._feeds(session, ids))))
        for name, value in out.items():
            if name.startswith("present.") and (".decoder." in name or self.length == 0):
                self.past["past_key_values." + name[len("present."):]] = value
        self.length += ids.shape[1]
        return out["logits"]
