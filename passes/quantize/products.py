"""C = AᵀB in float32 on onnxruntime's GEMM (MLAS), for the quantizer's large products (GPTQ's batch updates).

On x86-64 MLAS runs its AVX-512 kernels: 1.3–2× the rate of numpy's BLAS on these shapes, which the
environment may hold to AVX2 kernels (``OPENBLAS_CORETYPE``). MLAS splits a product over C's rows and
columns only, never over the inner dimension, so C's bytes do not depend on the thread count or on how B's
columns are sliced (a test checks both).
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from lmc.core.runtime import session


class TransposedProducts:
    """``into(a, b, out)``: out = aᵀ·b for a [K, M], b [K, N], out [M, N], all C-contiguous float32; one
    session per thread count, made on first use (safe to call from several threads at once)."""

    def __init__(self) -> None:
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def _session(self, threads: int) -> ort.InferenceSession:
        with self._lock:
            if threads not in self._sessions:
                graph = helper.make_graph(
                    [helper.make_node("Gemm", ["a", "b"], ["c"], transA=1)], "products",
                    [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["k", "m"]),
                     helper.make_tensor_value_info("b", TensorProto.FLOAT, ["k", "n"])],
                    [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["m", "n"])])
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                self._sessions[threads] = session(model.SerializeToString(), threads=threads)
            return self._sessions[threads]

    def into(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, threads: int = 1) -> np.ndarray:
        """out = aᵀ·b (written in place; ``threads`` onnxruntime threads). Returns ``out``."""
        for name, x in (("a", a), ("b", b), ("out", out)):
            if x.dtype != np.float32 or not x.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous float32")
        if a.shape[0] != b.shape[0] or out.shape != (a.shape[1], b.shape[1]):
            raise ValueError(f"shapes do not multiply: aᵀ {a.shape[::-1]} · b {b.shape} into {out.shape}")
        sess = self._session(max(1, threads))
        binding = sess.io_binding()
        binding.bind_cpu_input("a", a)
        binding.bind_cpu_input("b", b)
        binding.bind_output("c", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        sess.run_with_iobinding(binding)
        return out
