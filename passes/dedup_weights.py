"""Weight deduplication: constants with identical dtype, shape and bytes are stored once.

Exact. Candidates are grouped by (dtype, shape); within a group each constant's bytes are hashed
(SHA-256, one tensor loaded at a time), and equal digests are confirmed by comparing the bytes before the
consumers of the duplicate are pointed at the kept constant (the first one in graph order). Works for
every dtype, any size — from the scalar ``[1]`` vectors folding leaves behind to embedding tables.
Constants read inside subgraphs (If branches, Loop/Scan bodies, at any depth) take part like any other:
their readers are pointed at the kept constant as well (an exported subgraph lists the outer constants it
reads among its own initializers, so any scope may read the kept one).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core import ir
from lmc.core.pass_manager import PassContext, PassKind, PassResult, Requirement
from lmc.core.weights import take_flat


def _bytes(const: gs.Constant) -> bytes:
    return np.ascontiguousarray(ir.const_value(const)).tobytes()


def _probe(const: gs.Constant, samples: int = 64) -> bytes:
    """A strided sample of the flattened values (elements 0, step, 2·step, … of ``samples``), read without
    loading a file-backed or merged constant whole."""
    size = int(np.prod(const.shape, dtype=np.int64))
    step = max(1, size // samples)
    indices = np.arange(0, size, step, dtype=np.int64)[:samples]
    return np.ascontiguousarray(take_flat(const._values, indices)).tobytes()


def find_duplicates(consts: list[gs.Constant]) -> dict[int, gs.Constant]:
    """id(duplicate) -> the constant it equals (kept = first in the given order)."""
    groups: dict[tuple, list[gs.Constant]] = defaultdict(list)
    for c in consts:
        groups[(ir.onnx_dtype(c.dtype), tuple(c.shape))].append(c)
    replace: dict[int, gs.Constant] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        # cheap probe first (a strided sample of the bytes); hash only constants whose probe collides
        by_probe: dict[bytes, list[gs.Constant]] = defaultdict(list)
        for c in members:
            by_probe[_probe(c)].append(c)
        by_digest: dict[str, list[gs.Constant]] = defaultdict(list)
        for probed in by_probe.values():
            if len(probed) < 2:
                continue
            for c in probed:
                by_digest[hashlib.sha256(_bytes(c)).hexdigest()].append(c)
        for same in by_digest.values():
            kept = same[0]
            for dup in same[1:]:
                if _bytes(dup) == _bytes(kept):   # confirm: a digest match is not proof
                    replace[id(dup)] = kept
    return replace


class DedupWeights:
    name = "dedup-weights"
    kind = PassKind.EXACT
    requires = frozenset({Requirement.TOPOLOGICAL_ORDER})
    in_place = True
    preserves_shapes = True   # every tensor it leaves or creates has its dtype and shape set

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        consts = ir.constants(graph)
        replace = find_duplicates(consts)
        saved = 0
        for g in (graph, *ir.nested_graphs(graph)):      # constants read inside If/Loop/Scan bodies too
            for node in g.nodes:
                for i, t in enumerate(node.inputs):
                    kept = replace.get(id(t))
                    if kept is not None:
                        node.inputs[i] = kept
        for c in consts:
            if id(c) in replace:
                saved += ir.tensor_nbytes(c) or 0
        return PassResult(graph, modified=bool(replace),
                          stats={"duplicates_merged": len(replace), "bytes_saved": saved})
