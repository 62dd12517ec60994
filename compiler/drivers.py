"""Token-by-token drivers over onnxruntime: ``StateDecoder`` runs a generation bundle (its cache state bound
in place with IOBinding: the same OrtValue is the ``past`` input and the ``present`` output, so no step
copies the cache), ``PastDecoder`` runs an original past/present export the plain way (each ``present``
fed back as the next ``past``, the attention mask grown by one) — the reference a bundle is judged by.

Both expose ``forward(ids [B, S]) -> logits [B, S, V]`` (advancing the position by S) and ``reset()``;
``greedy(decoder, prompt, n)`` generates n tokens. Preconditions: batch rows advance together (a bundle
with an ``attention_mask`` input also takes right-padded rows, as onnxruntime-genai feeds them, see
``passes.attention_mask_input``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lmc.compiler import segmented
from lmc.core.errors import LmcError
from lmc.core.metadata import GenerationInfo, generation_info
from lmc.core.perplexity import Perplexity, from_nll, window_nll
from lmc.core.runtime import ORT_LOG_LEVEL, apply_session_options, bundle_session_options, loading

# for checks rather than speed: no prepacked second copy of the weights
LOW_MEMORY = {"config_entries": {"session.disable_prepacking": "1"}}


def _options(threads: int, session_options: dict | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_LOG_LEVEL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return apply_session_options(opts, session_options or {})


class StateDecoder:
    """A generation bundle under onnxruntime, its cache state held in place between steps."""

    def __init__(self, model_path: str | Path, threads: int = 0, session_options: dict | None = None,
                 warm_up: bool = True):
        info = generation_info(model_path)
        if info is None:
            raise LmcError(f"{model_path}: not a generation bundle (build it with lmc build --context N)")
        self.info = info
        self.model_path = Path(model_path)
        self.draft_policy = None     # prompt lookup's measured draft costs and kept counts (speculate.decode)
        settings = {**bundle_session_options(model_path), **(session_options or {})}
        with loading(settings, model_path):
            self.session = ort.InferenceSession(str(model_path), _options(threads, settings),
                                                providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        types = {i.name: i.type for i in self.session.get_inputs()}
        self.state = {}
        for name, _ in info.state:
            dtype = np.float16 if "float16" in types[name] else np.int8 if "int8" in types[name] else np.float32
            self.state[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shapes[name], dtype))
        self.binding = self.session.io_binding()
        self.binding.bind_output(info.logits)       # first: its index in get_outputs() stays 0
        # decode steps (one token per row) write into buffers bound once: the token ids, all-ones mask
        # columns, the logits — no per-step allocation, no wrapping of every output (the state included)
        logits = next(o for o in self.session.get_outputs() if o.name == info.logits)
        vocab = logits.shape[-1]
        self._ids = np.zeros((info.batch, 1), np.int64)
        self._ids_value = ort.OrtValue.ortvalue_from_numpy(self._ids)
        self._ones = np.ones((info.batch, info.context), np.int64)
        self._logits = self._logits_value = None
        if isinstance(vocab, int):
            self._logits = np.zeros((info.batch, 1, vocab), np.float16 if "float16" in logits.type else np.float32)
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        for src, dst in info.state:
            self.binding.bind_ortvalue_input(src, self.state[src])
            self.binding.bind_ortvalue_output(dst, self.state[src])
        self._decode_bound = False               # input ids and logits bound to the decode buffers right now
        # the greedy head's switch (lmc.passes.greedy_head), bound on every step that can change it
        self._greedy_values = {on: ort.OrtValue.ortvalue_from_numpy(np.array(on)) for on in (False, True)}
        self._greedy_on = False
        self._masks: dict[int, ort.OrtValue] = {}  # batch 1: the all-ones mask of each length, wrapped once
        self._positions = np.zeros((info.batch, 1), np.int64)
        self._positions_value = ort.OrtValue.ortvalue_from_numpy(self._positions)
        self.length = 0
        self._rows: np.ndarray | None = None     # per-row positions once rows are rewound apart (else all at length)
        self._written = np.zeros(info.batch, np.int64)   # per row: one past the furthest position written
        self._decoded_to = 0     # decode_step's last length, all rows: folded into _written by the next rewind
        if warm_up:
            # one step at the last position: the kernels' working memory reaches its full-context size
            # now (as the plan counts it), so memory stays flat while the context fills
            self.length = info.context - 1
            self._step(np.zeros((info.batch, 1), np.int64))
            self.reset()

    @property
    def state_bytes(self) -> int:
        return sum(v.numpy().nbytes for v in self.state.values())

    def vocab_size(self) -> int | None:
        """How many token ids ``input_ids`` takes: the rows of the table it is gathered from, else the
        logits' last dim; None when neither is known."""
        model = onnx.load(str(self.model_path), load_external_data=False)
        tables = {t.name: list(t.dims) for t in model.graph.initializer}
        for node in model.graph.node:
            if (node.op_type in ("Gather", "GatherBlockQuantized") and node.input[1:2] == [self.info.input_ids]
                    and node.input[0] in tables):
                axis = next((a.i for a in node.attribute if a.name == "gather_axis" or a.name == "axis"), 0)
                return int(tables[node.input[0]][axis])
        dim = next(o.shape[-1] for o in self.session.get_outputs() if o.name == self.info.logits)
        return dim if isinstance(dim, int) else None

    def reset(self) -> None:
        for value in self.state.values():
            value.update_inplace(np.zeros(value.shape(), value.numpy().dtype))
        self.length = 0
        self._rows = None
        self._written = np.zeros(self.info.batch, np.int64)
        self._decoded_to = 0

    def positions(self) -> np.ndarray:
        """Each batch row's position: where its next token goes (its tokens so far)."""
        return np.full(self.info.batch, self.length, np.int64) if self._rows is None else self._rows.copy()

    def written(self) -> np.ndarray:
        """Each batch row's furthest position written, plus one."""
        return np.maximum(self._written, self._decoded_to)

    def rewind(self, length: int | Sequence[int]) -> None:
        """Move the position back to ``length`` (one per batch row, or one for all): the next forward writes
        from there, over the rows a rejected draft left (never read before: keys beyond a query's position are
        masked). A bundle with windowed rings allows going back at most its prefill chunk from the furthest
        position written (``lmc.passes.static_cache.layout_for``: the ring's chunk − 1 extra slots are what
        such rows may have displaced, so no key a window still needs is lost and the stale ones are masked)."""
        rows = np.broadcast_to(np.asarray(length, dtype=np.int64), (self.info.batch,)).copy()
        now = self.positions()
        if np.any(rows < 0) or np.any(rows > now):
            raise LmcError(f"rewind to {rows.tolist()}: positions must be between 0 and the current {now.tolist()}")
        chunk = self.info.prefill_chunk or 1
        self._written, self._decoded_to = self.written(), 0
        if (self.info.windows or self.info.window) and np.any(self._written - rows > chunk):
            raise LmcError(f"rewind to {rows.tolist()}: a windowed ring goes back at most {chunk} positions (its "
                           f"prefill chunk) from the furthest written ({self._written.tolist()})")
        if not self.info.rows_apart and not np.all(rows == rows[0]):
            raise LmcError(f"rewind to {rows.tolist()}: this bundle's rows share row 0's positions (its export "
                           f"computes them from the cache length); rows must stay at one position")
        self._rows = None if np.all(rows == rows[0]) else rows
        self.length = int(rows.max())

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] of the next S tokens; a prompt longer than the bundle's prefill chunk runs in
        chunks (the plan's prefill profile holds at any prompt length)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(self.info.batch, -1)
        chunk = self.info.prefill_chunk or ids.shape[1]
        if ids.shape[1] > chunk:
            return np.concatenate([self._step(ids[:, i:i + chunk]) for i in range(0, ids.shape[1], chunk)], axis=1)
        return self._step(ids)

    def decode_step(self, tokens, greedy: bool = False) -> np.ndarray:
        """One token per batch row (``tokens`` [B]) while the rows are together: the next logits [B, V] —
        the decoder's own buffer, overwritten by the next step (copy what you keep). The plain decode loop's
        step: the token ids and logits stay bound to their buffers, the batch-1 mask of each length is wrapped
        once, nothing is allocated per step. Anything else (rows rewound apart, logits of unknown width, the
        context's end) takes ``forward``.

        ``greedy``: the caller reads only the argmax of each row. A bundle with a greedy head then returns
        −inf for every token that cannot be it (``lmc.passes.greedy_head``: same argmax, a cheaper step)."""
        length = self.length + 1
        if self._rows is not None or self._logits is None or length > self.info.context:
            return self.forward(np.asarray(tokens, dtype=np.int64).reshape(self.info.batch, 1))[:, -1]
        if self.info.greedy and greedy != self._greedy_on:
            self._switch_greedy(greedy)
        self._ids[:, 0] = tokens
        if not self._decode_bound:
            self.binding.bind_ortvalue_input(self.info.input_ids, self._ids_value)
            self.binding.bind_ortvalue_output(self.info.logits, self._logits_value)
            self._decode_bound = True
        if self.info.attention_mask and self.info.batch == 1:
            mask = self._masks.get(length)
            if mask is None:
                mask = self._masks[length] = ort.OrtValue.ortvalue_from_numpy(self._ones[:, :length])
            self.binding.bind_ortvalue_input(self.info.attention_mask, mask)
        elif self.info.attention_mask:
            self.binding.bind_cpu_input(self.info.attention_mask, np.ascontiguousarray(self._ones[:, :length]))
        else:
            self._positions[...] = self.length
            self.binding.bind_ortvalue_input(self.info.position_ids, self._positions_value)
        self.session.run_with_iobinding(self.binding)
        self.length = length
        self._decoded_to = length        # a Python int: no numpy call per step (it costs ~10 µs after a run)
        return self._logits[:, -1]

    def _switch_greedy(self, on: bool) -> None:
        self.binding.bind_ortvalue_input(self.info.greedy, self._greedy_values[on])
        self._greedy_on = on

    def _step(self, ids: np.ndarray) -> np.ndarray:
        s = ids.shape[1]
        if self._greedy_on:
            self._switch_greedy(False)
        starts = self.positions()
        if self.length + s > self.info.context:
            raise LmcError(f"the bundle takes positions below {self.info.context} (its --context); "
                           f"{self.length + s} requested (rebuild with a larger --context)")
        decode = s == 1 and self._logits is not None
        if decode:
            self._ids[...] = ids
            self.binding.bind_ortvalue_input(self.info.input_ids, self._ids_value)
        else:
            self.binding.bind_cpu_input(self.info.input_ids, ids)
        # positions derived in the graph from an attention mask (as onnxruntime-genai feeds it): all 1s while
        # the rows are together
        if self.info.attention_mask and self._rows is None:
            mask = self._ones[:, :self.length + s]
            self.binding.bind_cpu_input(self.info.attention_mask, mask if self.info.batch == 1 else mask.copy())
        elif self.info.attention_mask:
            # a row behind the others (rewound apart) has 0s between its tokens and the step's: its positions
            # are its own count of tokens, then consecutive
            cols = np.arange(self.length + s)
            mask = (cols < starts[:, None]) | (cols >= self.length)
            self.binding.bind_cpu_input(self.info.attention_mask, mask.astype(np.int64))
        else:
            positions = starts[:, None] + np.arange(s, dtype=np.int64)
            self.binding.bind_cpu_input(self.info.position_ids, np.ascontiguousarray(positions))
        if decode:
            self.binding.bind_ortvalue_output(self.info.logits, self._logits_value)
        else:
            self.binding.bind_output(self.info.logits)
        self.session.run_with_iobinding(self.binding)
        self._decode_bound = decode
        self.length += s
        self._rows = None if self._rows is None else self._rows + s
        self._written = np.maximum(self._written, starts + s)
        if decode:
            return self._logits.copy()            # the caller's: the buffer is written again next step
        outputs = self.binding.get_outputs()
        assert len(outputs) == len(self.info.state) + 1, "logits re-bound at a new index"
        return outputs[0].numpy()


def past_pairs(inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, str]:
    """An original export's state: each ``past_key_values.*`` input whose ``present.*`` output exists."""
    pairs = {}
    for name in inputs:
        if name.startswith("past"):
            out = name.replace("past_key_values", "present")
            if out in outputs:
                pairs[name] = out
    return pairs


def past_feeds(inputs: Collection[str], ids: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """The non-state feeds of an original export for ids [B, S] after ``length`` positions: the ids, an
    attention mask of ones over length + S positions, positions length … length + S − 1 (those it takes)."""
    batch, s = ids.shape
    feeds = {"input_ids": ids}
    if "attention_mask" in inputs:
        feeds["attention_mask"] = np.ones((batch, length + s), np.int64)
    if "position_ids" in inputs:
        feeds["position_ids"] = np.broadcast_to(np.arange(length, length + s, dtype=np.int64), ids.shape).copy()
    return feeds


class PastDecoder:
    """An original past/present export driven the plain way: present → past, attention mask grown."""

    def __init__(self, model_path: str | Path, threads: int = 0, batch: int = 1, session_options: dict | None = None):
        self.session = ort.InferenceSession(str(model_path), _options(threads, session_options),
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.pairs = past_pairs(list(self.inputs), outputs)
        self.logits = next(o for o in outputs if o not in self.pairs.values())
        self.batch = batch
        self.reset()

    def reset(self) -> None:
        self.past = {}
        for name in self.pairs:
            shape = self.inputs[name].shape
            self.past[name] = np.zeros((self.batch, int(shape[1]), 0, int(shape[3])), np.float32)
        self.length = 0

    def forward(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(self.batch, -1)
        feeds = past_feeds(self.inputs, ids, self.length)
        feeds.update(self.past)
        names = [self.logits] + list(self.pairs.values())
        values = self.session.run(names, feeds)
        self.past = {src: v for src, v in zip(self.pairs, values[1:])}
        self.length += ids.shape[1]
        return values[0]


def _original_io(model_path: str | Path, batch: int) -> tuple[list[str], dict[str, str], str, dict[str, np.ndarray]]:
    """An original export's input names, state pairs (``past_pairs``), logits output and empty pasts
    [batch, heads, 0, head size] of the state inputs' element types."""
    model = onnx.load(str(model_path), load_external_data=False)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    pairs = past_pairs(list(inputs), outputs)
    logits = next(o for o in outputs if o not in pairs.values())
    initial = {}
    for name in pairs:
        dims = [d.dim_value for d in inputs[name].shape.dim]
        initial[name] = np.zeros((batch, dims[1], 0, dims[3]),
                                 onnx.helper.tensor_dtype_to_np_dtype(inputs[name].elem_type))
    return list(inputs), pairs, logits, initial


def past_logits(model_path: str | Path, tokens: np.ndarray, spans: Sequence[tuple[int, int]],
                budget: int | None = None) -> list[np.ndarray]:
    """``PastDecoder``'s logits for the forward calls ``spans`` ((start, end) over ``tokens`` [B, L], in
    order from 0) without prepacking, the export run one segment of at most ``budget`` (default
    ``segmented.SEGMENT_BYTES``) bytes of weights at a time (``segmented.run_layer_major``): a check holds a
    segment of the original's weights, not all of them."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if [a for a, _ in spans] != [0] + [b for _, b in spans[:-1]]:
        raise ValueError(f"forward calls must follow each other from position 0: {list(spans)}")
    inputs, pairs, logits, initial = _original_io(model_path, tokens.shape[0])
    calls = [past_feeds(inputs, tokens[:, a:b], a) for a, b in spans]
    budget = segmented.SEGMENT_BYTES if budget is None else budget
    return [r[logits] for r in segmented.run_layer_major(model_path, calls, [logits], pairs, initial, budget)]


def past_perplexity(model_path: str | Path, windows: np.ndarray, chunk: int, budget: int | None = None) -> Perplexity:
    """``streaming_perplexity`` of an original export over token windows [N, L] (each from an empty
    cache, ``chunk`` tokens a call) without prepacking, one segment of at most ``budget`` (default
    ``segmented.SEGMENT_BYTES``) bytes of weights at a time; each window's logits are reduced to its negative
    log-likelihood as its last call comes out of the last segment, so no window's logits are kept."""
    inputs, pairs, logits, initial = _original_io(model_path, 1)
    windows = np.asarray(windows, dtype=np.int64)
    length = windows.shape[1]
    calls, owner, resets = [], [], set()
    for w, window in enumerate(windows):
        resets.add(len(calls))
        for a in range(0, length, chunk):
            calls.append(past_feeds(inputs, window[None, a:a + chunk], a))
            owner.append(w)
    parts: list[np.ndarray] = []
    total = [0.0]

    def consume(t: int, values: dict[str, np.ndarray]) -> None:
        parts.append(values[logits][0])
        if t + 1 == len(calls) or owner[t + 1] != owner[t]:
            total[0] += window_nll(np.concatenate(parts), windows[owner[t]])
            parts.clear()

    budget = segmented.SEGMENT_BYTES if budget is None else budget
    segmented.run_layer_major(model_path, calls, [logits], pairs, initial, budget, resets=resets, consume=consume)
    return from_nll(total[0], windows)


Decoder = StateDecoder | PastDecoder


def check_token_ids(ids: Sequence[int], vocab: int | None) -> None:
    """Refuse prompt ids outside 0 … ``vocab`` − 1 (onnxruntime fails on large ones and wraps negative
    ones round silently)."""
    values = np.asarray(ids, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((values < 0) | (values >= vocab)) if vocab is not None else []
    if len(bad):
        raise LmcError(f"token id {values[bad[0]]} (prompt position {bad[0]}) is outside the bundle's vocabulary: "
                       f"ids are 0 … {vocab - 1}")


def greedy(decoder: Decoder, prompt: Sequence[int], new_tokens: int,
           on_token: Callable[[int], None] | None = None) -> list[int]:
    """Greedy decoding: prefill ``prompt`` in one step, then one token per step; returns the new tokens."""
    decoder.reset()
    return continue_greedy(decoder, decoder.forward(np.asarray(prompt, dtype=np.int64)[None, :]), new_tokens, on_token)


def continue_greedy(decoder: Decoder, logits: np.ndarray, new_tokens: int,
                    on_token: Callable[[int], None] | None = None) -> list[int]:
    """``new_tokens`` greedy tokens, the first from ``logits`` (the last step's), each then fed back."""
    out: list[int] = []
    row = logits[0, -1]
    stepping = hasattr(decoder, "decode_step")
    for i in range(new_tokens):
        # the method, not np.argmax: after a decode step's run every numpy call is slow (cold caches), and
        # the function's dispatch costs ~7 µs more per token there
        token = int(row.argmax())
        out.append(token)
        if on_token is not None:
            on_token(token)
        if i + 1 < new_tokens and stepping:
            row = decoder.decode_step([token], greedy=True)[0]     # its buffer: read (argmax) before the next step
        elif i + 1 < new_tokens:
            row = decoder.forward(np.array([[token]], dtype=np.int64))[0, -1]
    return out


@dataclass(frozen=True)
class GenerationResult:
    """New tokens and how fast and how large the run was (``tokens_per_s``: decode steps per second
    after the prefill; ``peak_rss_bytes``: the process's peak resident set)."""

    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    peak_rss_bytes: int
    speculation: str = ""        # what drafted (``lmc.compiler.speculate``): "lookup:4", "draft:4", "off"
    drafted: int = 0             # draft tokens verified
    accepted: int = 0            # of them kept

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        steps = len(self.tokens) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 3),
                "peak_rss_bytes": self.peak_rss_bytes, "prompt_tokens": self.prompt_tokens,
                "prefill_seconds": round(self.prefill_seconds, 4), "decode_seconds": round(self.decode_seconds, 4),
                **({"speculation": self.speculation, "drafted": self.drafted, "accepted": self.accepted,
                    "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4)}
                   if self.speculation else {})}


def peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def bundle_model(bundle: str | Path) -> Path:
    p = Path(bundle)
    p = p / "model.onnx" if p.is_dir() else p
    if not p.is_file():
        raise LmcError(f"{bundle}: no bundle here (expected model.onnx)")
    return p


def read_prompt_tokens(path: str | Path) -> list[int]:
    """Whitespace-separated token ids from a text file."""
    p = Path(path)
    if not p.is_file():
        raise LmcError(f"{path}: no such prompt file")
    try:
        return [int(t) for t in p.read_text().split()]
    except ValueError:
        raise LmcError(f"{path}: expected whitespace-separated integer token ids") from None


def load_tokenizer(path: str | Path):
    """A Hugging Face ``tokenizers`` tokenizer.json (needs the optional ``tokenizers`` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise LmcError("--tokenizer needs the 'tokenizers' package: pip install 'lmc[text]'") from None
    if not Path(path).is_file():
        raise LmcError(f"{path}: no such tokenizer file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception types
        raise LmcError(f"{path}: not a tokenizer.json ({str(exc).splitlines()[0][:200]})") from None
