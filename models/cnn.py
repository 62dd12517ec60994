"""A small CNN with BatchNorm and branches, as a PyTorch export writes it.

stem Conv → BatchNormalization → Relu; an inception-style block (1×1 and 3×3 branches, Concat); a residual
block (Conv → BN → Relu → Conv → BN, Add, Relu); MaxPool; GlobalAveragePool → Flatten → Gemm.

Input ``image`` float32 [batch, 3, 32, 32]; output ``scores`` float32 [batch, 10].
"""

from __future__ import annotations

import numpy as np
import onnx

from lmc.models.builder import FLOAT, GraphBuilder


def _conv_bn(b: GraphBuilder, x: str, name: str, c_in: int, c_out: int, k: int, relu: bool = True) -> str:
    w = b.weight(f"{name}.conv.weight", [c_out, c_in, k, k], scale=float(np.sqrt(2.0 / (c_in * k * k))))
    y = b.op("Conv", [x, w], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[1, 1])
    bn = [b.weight(f"{name}.bn.weight", [c_out], value=1.0 + 0.1 * b.rng.standard_normal(c_out)),
          b.weight(f"{name}.bn.bias", [c_out], value=0.1 * b.rng.standard_normal(c_out)),
          b.weight(f"{name}.bn.running_mean", [c_out], value=0.1 * b.rng.standard_normal(c_out)),
          b.weight(f"{name}.bn.running_var", [c_out], value=0.5 + b.rng.random(c_out))]
    y = b.op("BatchNormalization", [y, *bn], epsilon=1e-5, momentum=0.9)
    return b.op("Relu", [y]) if relu else y


def build_cnn(seed: int = 2, channels: int = 16, classes: int = 10) -> onnx.ModelProto:
    b = GraphBuilder("small-cnn", seed=seed)
    x = b.input("image", FLOAT, ["batch", 3, 32, 32])
    x = _conv_bn(b, x, "stem", 3, channels, 3)
    left = _conv_bn(b, x, "inc.b1", channels, channels, 1)
    right = _conv_bn(b, _conv_bn(b, x, "inc.b2a", channels, channels // 2, 1), "inc.b2b", channels // 2,
                     channels, 3)
    x = b.op("Concat", [left, right], axis=1)
    c = 2 * channels
    y = _conv_bn(b, _conv_bn(b, x, "res.a", c, c, 3), "res.b", c, c, 3, relu=False)
    x = b.op("Relu", [b.op("Add", [x, y])])
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    b.op("Gemm", [x, b.weight("fc.weight", [classes, c]), b.weight("fc.bias", [classes], scale=0.1)], transB=1)
    b.rename_last_output("scores")
    b.output("scores", FLOAT, ["batch", classes])
    return b.model()
