"""A bundle's ``lmc.*`` metadata: how it was built (target, quantization, attention, bound inputs), stored
in its model's ``metadata_props`` — deterministic: no times, no paths."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmc.compiler.errors import LmcError

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
