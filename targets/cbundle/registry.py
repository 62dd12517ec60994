"""The op registry of the C emitter: (domain, op_type) -> an emitter function.

An emitter receives an ``OpContext`` — the node, its input and output tensors as ``TensorRef`` (dtype,
static shape, where the bytes are: arena offset, graph input/output, weight in flash, or a constant read at
emission time) — validates what it supports (attributes, shapes, dtypes) and returns a ``KernelCall``: the C
statements that run the node, the kernel families they need (``lmc_kernels_<family>.c``) and the node's
multiply–accumulates. Anything it cannot do is ``op.unsupported(reason)``, an ``UnsupportedOp`` (an
``LmcError``) naming the node and its op.

Registration is explicit: ``@REGISTRY.op("Conv")`` (or ``REGISTRY.add(domain, op, fn)``) in an ``ops_*``
module of this package; ``load_op_modules()`` imports every ``ops_*`` module here in name order, so adding
a module is all it takes to add ops. Registering one (domain, op) twice is an error; a family that covers
other cases of an op another family registered (e.g. int64 Add beside the float one) adds a *fallback*
(``REGISTRY.add_fallback``), tried in registration order when the emitters before it refuse the node.
"""

from __future__ import annotations

import enum
import importlib
import math
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lmc.core.errors import LmcError


class UnsupportedOp(LmcError):
    """A node the C emitter has no kernel for (or an attribute, shape or dtype its kernel does not take)."""


class Placement(enum.Enum):
    ARENA = "arena"          # an intermediate at its planned offset in lmc_arena
    INPUT = "input"          # graph input k: inputs[k]
    OUTPUT = "output"        # graph output k: outputs[k]
    WEIGHT = "weight"        # an initializer, a const array in weights.c (flash)
    DECODED = "decoded"      # a weight the consumer decodes itself (plan.decoded_weights): no buffer


# numpy dtype -> C element type
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.int8): "int8_t", np.dtype(np.uint8): "uint8_t",
           np.dtype(np.int16): "int16_t", np.dtype(np.int32): "int32_t", np.dtype(np.int64): "int64_t",
           np.dtype(np.uint16): "uint16_t", np.dtype(np.uint32): "uint32_t", np.dtype(np.bool_): "uint8_t"}


@dataclass(frozen=True)
class TensorRef:
    """One tensor as the C code sees it. ``address`` is a C expression of its first byte's address (an
    ``uint8_t *``/``void *`` expression); ``ptr(...)`` casts it to the element type. ``value`` is set for
    constants (initializers), so emitters may read small ones (shapes, bounds, scales) at emission time."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    placement: Placement
    address: str
    value: np.ndarray | None = None
    symbol: str = ""                # WEIGHT: the array's name in weights.c

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def ctype(self) -> str:
        try:
            return C_TYPES[self.dtype]
        except KeyError:
            raise LmcError(f"tensor '{self.name}': dtype {self.dtype} has no C type in the C bundle") from None

    def ptr(self, const: bool = True) -> str:
        """The tensor as a typed pointer expression (``const`` for reads)."""
        qual = "const " if const else ""
        return f"(({qual}{self.ctype} *){self.address})"

    @property
    def out(self) -> str:
        """The tensor as a writable typed pointer expression."""
        return self.ptr(const=False)


@dataclass(frozen=True)
class KernelCall:
    """What one node becomes: C statements (inside ``lmc_run``), static const parameter definitions
    (file scope, before ``lmc_run``), the kernel families used and the node's multiply–accumulates."""

    code: str
    families: tuple[str, ...] = ()
    params: str = ""
    macs: int = 0


@dataclass
class OpContext:
    """What an emitter sees of one node. ``inputs[i]`` is None for an omitted optional input."""

    node: gs.Node
    inputs: list[TensorRef | None]
    outputs: list[TensorRef]
    index: int                          # the node's step in the schedule (unique names for parameters)
    alignment: int
    opset: int = 21                      # the graph's ONNX opset (attribute semantics change with it)
    resolve: Callable[[gs.Tensor], TensorRef] | None = None   # any tensor of the graph -> its TensorRef
    weights_used: set[str] = field(default_factory=set)

    @property
    def op_type(self) -> str:
        return self.node.op

    @property
    def prefix(self) -> str:
        """A C identifier unique to this node, for its static parameters."""
        return f"lmc_p{self.index}"

    def unsupported(self, reason: str) -> UnsupportedOp:
        domain = f"{self.node.domain}." if self.node.domain and self.node.domain != "ai.onnx" else ""
        return UnsupportedOp(f"node '{self.node.name}' ({domain}{self.node.op}): {reason}")

    def attr(self, name: str, default: Any = None) -> Any:
        return self.node.attrs.get(name, default)

    def input(self, i: int, required: bool = True) -> TensorRef | None:
        ref = self.inputs[i] if i < len(self.inputs) else None
        if ref is None and required:
            raise self.unsupported(f"input {i} is missing")
        if ref is not None and ref.placement is Placement.WEIGHT:
            self.weights_used.add(ref.name)
        return ref

    def ref(self, tensor: gs.Tensor) -> TensorRef:
        """The TensorRef of any tensor (e.g. the quantized weight behind a decoded input); a weight asked
        for this way is written to flash."""
        ref = self.resolve(tensor)
        if ref.placement is Placement.WEIGHT:
            self.weights_used.add(ref.name)
        return ref

    def const(self, i: int) -> np.ndarray | None:
        """The value of input i when it is a constant (read at emission time: not written to flash for
        this use), None when it is omitted or computed at run time."""
        ref = self.inputs[i] if i < len(self.inputs) else None
        return None if ref is None else ref.value

    def expect_dtype(self, refs: Sequence[TensorRef | None], *dtypes) -> None:
        allowed = {np.dtype(d) for d in dtypes}
        for r in refs:
            if r is not None and r.dtype not in allowed:
                names = "/".join(str(d) for d in sorted(allowed, key=str))
                raise self.unsupported(f"tensor '{r.name}' is {r.dtype}; the kernel takes {names}")


Emitter = Callable[[OpContext], KernelCall]


class Registry:
    """(domain, op_type) -> emitter. The ONNX domain is ``""`` (``"ai.onnx"`` is read as ``""``)."""

    def __init__(self) -> None:
        self._emitters: dict[tuple[str, str], Emitter] = {}
        self._fallbacks: dict[tuple[str, str], list[Emitter]] = {}

    @staticmethod
    def _key(domain: str, op_type: str) -> tuple[str, str]:
        return ("" if domain in ("", "ai.onnx") else domain, op_type)

    def add(self, domain: str, op_type: str, fn: Emitter) -> None:
        key = self._key(domain, op_type)
        if key in self._emitters:
            raise ValueError(f"C emitter for {key} registered twice")
        self._emitters[key] = fn

    def add_fallback(self, domain: str, op_type: str, fn: Emitter) -> None:
        """Register ``fn`` behind the emitter already registered for (domain, op_type): it runs when that
        one raises ``UnsupportedOp`` (a second family's kernels for the cases the first does not take, e.g.
        int64 arithmetic beside float kernels). Refused by both: the first one's reason."""
        key = self._key(domain, op_type)
        first = self._emitters.get(key)
        if first is None:
            self._emitters[key] = fn
            return

        def chained(ctx: OpContext) -> KernelCall:
            try:
                return first(ctx)
            except UnsupportedOp as refused:
                try:
                    return fn(ctx)
                except UnsupportedOp:
                    raise refused from None
        self._emitters[key] = chained

    def add_fallback(self, domain: str, op_type: str, fn: Emitter) -> None:
        """``fn`` is tried for (domain, op_type) when the emitters before it refuse the node (``UnsupportedOp``,
        e.g. a dtype the first family's kernel does not take); with no primary emitter it is the first."""
        self._fallbacks.setdefault(self._key(domain, op_type), []).append(fn)

    def op(self, *op_types: str, domain: str = "") -> Callable[[Emitter], Emitter]:
        """Decorator: register ``fn`` for each of ``op_types`` in ``domain``."""
        def register(fn: Emitter) -> Emitter:
            for op_type in op_types:
                self.add(domain, op_type, fn)
            return fn
        return register

    def lookup(self, domain: str, op_type: str) -> list[Emitter]:
        """The emitters of (domain, op_type) in the order they are tried (empty: unsupported)."""
        key = self._key(domain or "", op_type)
        return ([self._emitters[key]] if key in self._emitters else []) + self._fallbacks.get(key, [])

    def ops(self) -> list[tuple[str, str]]:
        return sorted(set(self._emitters) | set(self._fallbacks))

    def emit(self, ctx: OpContext) -> KernelCall:
        """The first emitter's call that accepts the node; when all refuse, the first refusal."""
        emitters = self.lookup(ctx.node.domain or "", ctx.node.op)
        if not emitters:
            raise ctx.unsupported(f"the C bundle has no kernel for this op ({len(self.ops())} ops have one: "
                                  "lmc.targets.cbundle.registry.REGISTRY.ops())")
        first: UnsupportedOp | None = None
        for fn in emitters:
            used = set(ctx.weights_used)
            try:
                return fn(ctx)
            except UnsupportedOp as exc:
                ctx.weights_used = used           # what a refusing emitter asked for is not written
                first = first or exc
        raise first


REGISTRY = Registry()
_loaded = False


def load_op_modules() -> Registry:
    """Import every ``ops_*`` module of this package (name order) once; their decorators fill REGISTRY."""
    global _loaded
    if not _loaded:
        package = __name__.rpartition(".")[0]
        path = importlib.import_module(package).__path__
        for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
            if info.name.startswith("ops_"):
                importlib.import_module(f"{package}.{info.name}")
        _loaded = True
    return REGISTRY
