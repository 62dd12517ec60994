"""A bundle's ``lmc.*`` metadata: how it was built (target, quantization, attention, bound inputs), stored
in its model's ``metadata_props`` — deterministic: no times, no paths."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lmc.core.errors import LmcError

METADATA_PREFIX = "lmc."


def _plain(value, name: str):
    """A bound input value as plain JSON data: numbers (bool, int, finite float) and lists of them."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v, name) for v in value]
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float) and np.isfinite(value):
        return value
    raise LmcError(f"--input-value {name}: {value!r} is not a finite number or a list of numbers")


def encode_input_values(values: Mapping[str, Any]) -> str:
    """``input_values`` as the bundle records them (``lmc.input_values``): canonical JSON, keys sorted."""
    return json.dumps({k: _plain(v, k) for k, v in values.items()}, sort_keys=True, separators=(",", ":"))


def decode_input_values(text: str) -> dict[str, np.ndarray]:
    """The ``lmc.input_values`` metadata back as arrays (name -> value)."""
    return {k: np.asarray(v) for k, v in json.loads(text).items()} if text else {}


def build_metadata(model) -> dict[str, str]:
    """The ``lmc.*`` metadata of a bundle's model (empty for models lmc did not build)."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


GENERATION_KEY = "lmc.generation"


@dataclass(frozen=True)
class GenerationInfo:
    """What a driver needs to know about a generation bundle (stored as JSON in the model's metadata)."""

    context: int
    batch: int
    input_ids: str
    position_ids: str
    logits: str
    state: tuple[tuple[str, str], ...]      # (input, output) pairs bound to one buffer
    window: int = 0                          # sliding window (0: full attention)
    sinks: int = 0
    prefill_chunk: int = 0                   # prompts run in steps of at most this many tokens (0: any)
    windows: tuple[int, ...] = ()            # the distinct attention windows of its layers (model's and user's)
    attention_mask: str = ""                 # [B, total] input the positions come from (empty: position_ids is one)
    rows_apart: bool = True                  # batch rows may stand at different positions (False: the export
                                             # computes positions from the cache length; row 0's serve every row)
    greedy: str = ""                         # bool input asking a decode step for the greedy head (empty: none)

    def to_json(self) -> str:
        return json.dumps({"context": self.context, "batch": self.batch, "input_ids": self.input_ids,
                           "position_ids": self.position_ids, "logits": self.logits,
                           "state": [list(p) for p in self.state], "window": self.window, "sinks": self.sinks,
                           "prefill_chunk": self.prefill_chunk, "windows": list(self.windows),
                           **({"attention_mask": self.attention_mask} if self.attention_mask else {}),
                           **({} if self.rows_apart else {"rows_apart": False}),
                           **({"greedy": self.greedy} if self.greedy else {})},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GenerationInfo":
        d = json.loads(text)
        return cls(int(d["context"]), int(d["batch"]), d["input_ids"], d["position_ids"], d["logits"],
                   tuple(tuple(p) for p in d["state"]), int(d.get("window", 0)), int(d.get("sinks", 0)),
                   int(d.get("prefill_chunk", 0)), tuple(int(w) for w in d.get("windows", ())),
                   d.get("attention_mask", ""), bool(d.get("rows_apart", True)), d.get("greedy", ""))


def generation_info(model_path: str | Path) -> GenerationInfo | None:
    """The generation metadata of a bundle's model, or None for a one-shot model."""
    model = onnx.load(str(model_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == GENERATION_KEY:
            return GenerationInfo.from_json(prop.value)
    return None
