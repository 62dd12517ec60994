"""Gram matrices G = Σ XᵀX of a tensor's rows over calibration samples (GPTQ's Hessians), float32.

Rows arrive a sample at a time (S rows of K features) and wait in a buffer of max(S, min(K, ``ROWS``))
rows, so that each product's inner dimension is large enough for the GEMM's full rate and adding its
blocks to G is paid once per buffer, not per sample; a full buffer X [n, K] adds XᵀX to G. The product
runs on onnxruntime's GEMM (MLAS: 1.3–1.6× the rate of numpy's BLAS on these shapes on x86-64) over
column parts: K = P·w, X = [X₁ … X_P]; only the blocks on and above the diagonal, XᵢᵀXⱼ for i ≤ j
(P(P+1)/2 of the P² products: 10 of 16 for P = 4), are formed and added to G's upper blocks, and
``GramSum.result`` mirrors the lower ones once. Where P does not divide K, or K < ``MIN_SPLIT``, numpy
forms XᵀX whole.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from lmc.core.runtime import session

GRAM_DTYPE = np.float32       # single-precision products over activations onnxruntime computes in float32
PARTS = 4
MIN_SPLIT = 1024
ROWS = 2048                   # rows a product takes at least (MLAS runs at its full rate from ~512)


class GramProducts:
    """XᵀX products on onnxruntime, one session per feature count K, outputs written into arrays bound
    once (the block shapes do not depend on the row count)."""

    def __init__(self) -> None:
        self._sessions: dict[int, tuple[ort.InferenceSession, object, list[tuple[int, int, np.ndarray]]]] = {}

    @staticmethod
    def splits(k: int) -> bool:
        return k >= MIN_SPLIT and k % PARTS == 0

    def _session(self, k: int):
        if k not in self._sessions:
            w = k // PARTS
            parts = [f"x{i}" for i in range(PARTS)]
            nodes = [helper.make_node("Split", ["x", "sizes"], parts, axis=1)]
            blocks = [(i, j) for i in range(PARTS) for j in range(i, PARTS)]
            nodes += [helper.make_node("Gemm", [parts[i], parts[j]], [f"g{i}_{j}"], transA=1) for i, j in blocks]
            graph = helper.make_graph(
                nodes, "gram", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                [helper.make_tensor_value_info(f"g{i}_{j}", TensorProto.FLOAT, [w, w]) for i, j in blocks],
                initializer=[onnx.numpy_helper.from_array(np.full(PARTS, w, np.int64), "sizes")])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            sess = session(model.SerializeToString())
            binding = sess.io_binding()
            outputs = []
            for i, j in blocks:
                out = np.empty((w, w), GRAM_DTYPE)
                binding.bind_output(f"g{i}_{j}", "cpu", 0, out.dtype, out.shape, out.ctypes.data)
                outputs.append((i, j, out))
            self._sessions[k] = (sess, binding, outputs)
        return self._sessions[k]

    def add_into(self, gram: np.ndarray, x: np.ndarray, first: bool = False) -> None:
        """G's upper blocks += the upper blocks of XᵀX (x [n, K] C-contiguous float32, K split); ``first``:
        G's upper blocks = them (G's memory not yet written: each page is faulted in once, by a write)."""
        sess, binding, outputs = self._session(x.shape[1])
        w = x.shape[1] // PARTS
        binding.bind_cpu_input("x", x)
        sess.run_with_iobinding(binding)
        for i, j, out in outputs:
            block = gram[i * w:(i + 1) * w, j * w:(j + 1) * w]
            if first:
                block[...] = out
            else:
                block += out


class GramSum:
    """Σ XᵀX over the rows ``add``-ed, ``rows`` per call (the buffer: max(rows, min(features, ``ROWS``))
    rows, reused, so rows are copied in)."""

    def __init__(self, rows: int, features: int, products: GramProducts):
        self.products = products
        self.buf = np.empty((max(rows, min(features, ROWS)), features), dtype=GRAM_DTYPE)
        self.filled = 0
        self.gram: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if self.filled + len(x) > len(self.buf):
            self._flush()
        if len(x) >= len(self.buf):                 # as many rows as the buffer holds: straight in
            self._product(np.ascontiguousarray(x, dtype=GRAM_DTYPE))
            return
        self.buf[self.filled:self.filled + len(x)] = x
        self.filled += len(x)
        if self.filled == len(self.buf):
            self._flush()

    def _flush(self) -> None:
        if self.filled:
            self._product(self.buf[:self.filled])
            self.filled = 0

    def _product(self, x: np.ndarray) -> None:
        k = x.shape[1]
        first = self.gram is None
        if self.products.splits(k):
            if first:
                self.gram = np.empty((k, k), GRAM_DTYPE)
            self.products.add_into(self.gram, x, first)
        elif first:
            self.gram = x.T @ x
        else:
            self.gram += x.T @ x

    def result(self) -> np.ndarray:
        """G = Σ XᵀX (symmetric), the buffer released."""
        self._flush()
        self.buf = None
        gram = self.gram
        k = gram.shape[0]
        if self.products.splits(k):
            w = k // PARTS
            for i in range(PARTS):
                for j in range(i + 1, PARTS):
                    gram[j * w:(j + 1) * w, i * w:(i + 1) * w] = gram[i * w:(i + 1) * w, j * w:(j + 1) * w].T
        return gram
