"""Measurements the bench scripts share: this process's memory counters and a model's bytes on disk."""

from __future__ import annotations

from pathlib import Path

import onnx


def status(field: str) -> int:
    """A memory field of /proc/self/status in bytes (``VmRSS``, ``VmHWM``, ``RssFile``, ``RssAnon``; a
    trailing colon is optional); 0 where the field (or /proc) is absent. VmHWM is this process image's
    peak RSS: ru_maxrss would carry a parent's peak across fork + exec."""
    name = field.rstrip(":")
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == name:
                    return int(value.split()[0]) * 1024
    except OSError:
        pass
    return 0


def size_of(model: Path) -> int:
    """Bytes of ``model`` and of every external-data file its initializers name."""
    m = onnx.load(str(model), load_external_data=False)
    files = {model}
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                files.add(model.parent / e.value)
    return sum(f.stat().st_size for f in files)
