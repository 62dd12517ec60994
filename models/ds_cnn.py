"""A DS-CNN keyword-spotting model (MLPerf Tiny's layout) as a PyTorch export writes it, random weights.

Input ``input`` float32 [1, 1, 49, 10] (49 frames × 10 MFCC); stem Conv 10×4 stride 2 (pads 5, 1) to
``channels`` → BatchNormalization → Relu; ``blocks`` depthwise-separable blocks (3×3 depthwise Conv, pads 1,
→ BN → Relu, 1×1 pointwise Conv → BN → Relu); AveragePool over the whole 25×5 map → Flatten → Gemm to
``classes`` scores (output ``scores`` [1, classes]). The committed fixture
``models/fixtures/mcu/ds_cnn.onnx`` is the torch export of the same layout
(``models/exporters/export_mcu_fixtures.py``); this builder serves unit tests without it.
"""

from __future__ import annotations

import numpy as np
import onnx

from lmc.models.builder import FLOAT, GraphBuilder


def _conv_bn_relu(b: GraphBuilder, x: str, name: str, c_in: int, c_out: int, kernel: tuple[int, int],
                  strides=(1, 1), pads=(0, 0, 0, 0), group: int = 1) -> str:
    fan_in = (c_in // group) * kernel[0] * kernel[1]
    w = b.weight(f"{name}.weight", [c_out, c_in // group, *kernel], scale=float(np.sqrt(2.0 / fan_in)))
    y = b.op("Conv", [x, w], kernel_shape=list(kernel), strides=list(strides), pads=list(pads), group=group,
             dilations=[1, 1])
    bn = [b.weight(f"{name}.bn.weight", [c_out], value=1.0 + 0.1 * b.rng.standard_normal(c_out)),
          b.weight(f"{name}.bn.bias", [c_out], value=0.1 * b.rng.standard_normal(c_out)),
          b.weight(f"{name}.bn.running_mean", [c_out], value=0.1 * b.rng.standard_normal(c_out)),
          b.weight(f"{name}.bn.running_var", [c_out], value=0.5 + b.rng.random(c_out))]
    y = b.op("BatchNormalization", [y, *bn], epsilon=1e-5, momentum=0.9)
    return b.op("Relu", [y])


def build_ds_cnn(seed: int = 3, channels: int = 64, blocks: int = 4, classes: int = 12) -> onnx.ModelProto:
    b = GraphBuilder("ds-cnn", seed=seed, opset=17)
    x = b.input("input", FLOAT, [1, 1, 49, 10])
    x = _conv_bn_relu(b, x, "stem", 1, channels, (10, 4), strides=(2, 2), pads=(5, 1, 5, 1))
    for i in range(blocks):
        x = _conv_bn_relu(b, x, f"block{i}.dw", channels, channels, (3, 3), pads=(1, 1, 1, 1), group=channels)
        x = _conv_bn_relu(b, x, f"block{i}.pw", channels, channels, (1, 1))
    x = b.op("AveragePool", [x], kernel_shape=[25, 5], strides=[25, 5])
    x = b.op("Flatten", [x], axis=1)
    b.op("Gemm", [x, b.weight("fc.weight", [classes, channels]), b.weight("fc.bias", [classes], scale=0.1)],
         transB=1)
    b.rename_last_output("scores")
    b.output("scores", FLOAT, [1, classes])
    return b.model()
