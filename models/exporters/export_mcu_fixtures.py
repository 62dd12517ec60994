"""Write the DS-CNN keyword-spotting fixture for the microcontroller C bundle: ``mcu/ds_cnn.onnx``.

Run ``python models/exporters/export_mcu_fixtures.py [OUT_DIR]`` (after ``pip install -e ".[export]"``);
OUT_DIR defaults to ``models/fixtures/mcu``.

Layout (MLPerf Tiny's keyword-spotting DS-CNN): input ``input`` float32 [1, 1, 49, 10] (49 frames × 10
MFCC), Conv 10×4 stride 2 (padding 5, 1) to 64 channels + BatchNorm + ReLU → 25×5; four depthwise-separable
blocks (3×3 depthwise Conv, padding 1, + BN + ReLU; 1×1 pointwise Conv + BN + ReLU); AvgPool 25×5; Flatten;
Linear to 12 classes (output ``scores`` [1, 12]). Random weights (seed 0) with BatchNorm running statistics
and affine parameters perturbed so folding them is not an identity. Exported by ``torch.onnx.export`` (the
TorchScript exporter, opset 17, eval mode: the exporter folds each BatchNorm into its Conv, so the file has
Conv/Relu ×9, AveragePool, Flatten, Gemm — as deployed keyword-spotting exports do; ``lmc.models.build_ds_cnn``
keeps BatchNormalization nodes for lmc's own fusion).

The file is checked before it is kept: onnxruntime equals torch within 1e-5 on random inputs, and it stays
under 1 MiB. ``ds_cnn.md`` beside it records the versions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "fixtures" / "mcu"
NAME = "ds_cnn"
MAX_BYTES = 1 << 20
CHANNELS, BLOCKS, CLASSES = 64, 4, 12
INPUT_SHAPE = (1, 1, 49, 10)


def _model():
    import torch
    from torch import nn

    def conv_bn(c_in, c_out, kernel, stride=1, padding=0, groups=1):
        return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=False),
                nn.BatchNorm2d(c_out), nn.ReLU()]

    layers = conv_bn(1, CHANNELS, (10, 4), stride=2, padding=(5, 1))
    for _ in range(BLOCKS):
        layers += conv_bn(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS)
        layers += conv_bn(CHANNELS, CHANNELS, 1)

    class DsCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.pool = nn.AvgPool2d((25, 5))
            self.fc = nn.Linear(CHANNELS, CLASSES)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    torch.manual_seed(0)
    model = DsCnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.1 * torch.randn_like(m.weight))
                m.bias.copy_(0.1 * torch.randn_like(m.bias))
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    import onnx
    import onnxruntime as ort
    import torch

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    model = _model()
    path = out / f"{NAME}.onnx"
    x = torch.randn(*INPUT_SHAPE)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["scores"], opset_version=17,
                      dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(4):
        feed = rng.standard_normal(INPUT_SHAPE).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(feed)).numpy()
        got = sess.run(None, {"input": feed})[0]
        worst = max(worst, float(np.abs(got - ref).max() / np.abs(ref).max()))
    if worst > 1e-5:
        path.unlink()
        raise SystemExit(f"onnxruntime differs from torch by {worst:.3g} relative; nothing kept")
    size = path.stat().st_size
    if size > MAX_BYTES:
        path.unlink()
        raise SystemExit(f"{path.name} is {size} bytes, over the {MAX_BYTES} allowed a fixture")
    proto = onnx.load(str(path))
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    (out / f"{NAME}.md").write_text(
        f"# {NAME}.onnx\n\nDS-CNN keyword spotting (MLPerf Tiny layout): input `input` float32 {list(INPUT_SHAPE)}, "
        f"Conv 10×4/2 to {CHANNELS} channels + BN + ReLU, {BLOCKS} depthwise-separable blocks, AvgPool 25×5, "
        f"Linear to {CLASSES} (`scores`). Random weights (seed 0), {params} parameters (BatchNorm statistics "
        f"included), {size} bytes. Written by `torch.onnx.export` (TorchScript exporter, opset 17); onnxruntime "
        f"equals torch within {worst:.1e} relative.\n\nRegenerate: `python models/exporters/export_mcu_fixtures.py "
        f"models/fixtures/mcu` (needs the `export` extra).\n\nVersions: torch {torch.__version__}, onnx "
        f"{onnx.__version__}, onnxruntime {ort.__version__}.\n\nOperators: "
        + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])) + ".\n")
    print(f"{path} ({size} bytes, {params} parameters, max relative error vs torch {worst:.2e})")


if __name__ == "__main__":
    main()
