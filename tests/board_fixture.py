"""A C bundle written by hand to the C-bundle contract, for the board tests (tests/test_board.py,
tests/test_on_board.py): y = tanh(x · w) + b (float32 [1, 8], the product held in the arena at offset 16),
r = QuantizeLinear(y, 1/64) (int8 [1, 8]) and g = gate (int8 [4]); lmc_run returns 9 when gate starts with
99, 99 (to see its code reach the exit status). ``fixture_model`` is the same graph in ONNX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

W = np.array([0.5, -1.25, 2.0, 0.75, -0.3, 1.5, -2.5, 0.1], dtype=np.float32)
B = np.float32(0.25)
SCALE = np.float32(1 / 64)
ARENA = 64

MODEL_H = """#ifndef LMC_MODEL_H
#define LMC_MODEL_H
#include <stddef.h>
#include <stdint.h>
#define LMC_ARENA_BYTES {arena}
#define LMC_NUM_INPUTS 2
#define LMC_NUM_OUTPUTS 3
/* inputs: x float32 [1, 8], gate int8 [4]; outputs: y float32 [1, 8], r int8 [1, 8], g int8 [4] */
extern const size_t lmc_input_bytes[LMC_NUM_INPUTS];
extern const size_t lmc_output_bytes[LMC_NUM_OUTPUTS];
int lmc_run(const void *const *inputs, void *const *outputs);
#endif
"""

MODEL_C = """#include <math.h>
#include <string.h>
#include "model.h"
extern const float lmc_w_w[8];
extern const float lmc_w_b[1];
const size_t lmc_input_bytes[LMC_NUM_INPUTS] = {32, 4};
const size_t lmc_output_bytes[LMC_NUM_OUTPUTS] = {32, 8, 4};
static _Alignas(16) uint8_t lmc_arena[LMC_ARENA_BYTES];

int lmc_run(const void *const *inputs, void *const *outputs)
{
    const float *x = (const float *)inputs[0];
    const int8_t *gate = (const int8_t *)inputs[1];
    float *t = (float *)(lmc_arena + 16);
    float *y = (float *)outputs[0];
    int8_t *r = (int8_t *)outputs[1];
    int i;
    if (gate[0] == 99 && gate[1] == 99)
        return 9;
    /* step 0: Mul 'mul' */
    for (i = 0; i < 8; i++)
        t[i] = x[i] * lmc_w_w[i];
    /* step 1: Add 'add' */
    for (i = 0; i < 8; i++) {
        float q;
        y[i] = tanhf(t[i]) + lmc_w_b[0]{skew};
        q = nearbyintf(y[i] / (1.0f / 64.0f));
        r[i] = (int8_t)(q > 127.0f ? 127.0f : q < -128.0f ? -128.0f : q);
    }
    memcpy(outputs[2], gate, 4);
    return 0;
}
"""

WEIGHTS_C = """#include "model.h"
const _Alignas(16) float lmc_w_w[8] = {%s};
const _Alignas(16) float lmc_w_b[1] = {%s};
""" % (", ".join(f"{v!r}f" for v in W.tolist()), f"{float(B)!r}f")

RUNNER_C = """#include <stdio.h>
#include "model.h"
static _Alignas(16) uint8_t in0[32], in1[4];
static _Alignas(16) uint8_t out0[32], out1[8], out2[4];

static int read_input(const char *name, void *buf, size_t n)
{
    FILE *f = fopen(name, "rb");
    size_t got;
    if (f == NULL)
        return 0;
    got = fread(buf, 1, n, f);
    fclose(f);
    return got == n;
}

int main(void)
{
    const void *inputs[LMC_NUM_INPUTS] = {in0, in1};
    void *outputs[LMC_NUM_OUTPUTS] = {out0, out1, out2};
    static const char *const names[LMC_NUM_OUTPUTS] = {"lmc_out_0.bin", "lmc_out_1.bin", "lmc_out_2.bin"};
    int k, rc;
    if (!read_input("lmc_in_0.bin", in0, lmc_input_bytes[0]) || !read_input("lmc_in_1.bin", in1, lmc_input_bytes[1]))
        return 2;
    rc = lmc_run(inputs, outputs);
    if (rc != 0)
        return rc;
    for (k = 0; k < LMC_NUM_OUTPUTS; k++) {
        FILE *f = fopen(names[k], "wb");
        if (f == NULL || fwrite(outputs[k], 1, lmc_output_bytes[k], f) != lmc_output_bytes[k])
            return 3;
        fclose(f);
    }
    return 0;
}
"""


def fixture_model() -> onnx.ModelProto:
    """The bundle's computation as ONNX: y = Tanh(x · w) + b, r = QuantizeLinear(y, 1/64), g = Identity(gate)."""
    nodes = [helper.make_node("Mul", ["x", "w"], ["t"], name="mul"),
             helper.make_node("Tanh", ["t"], ["u"], name="tanh"),
             helper.make_node("Add", ["u", "b"], ["y"], name="add"),
             helper.make_node("QuantizeLinear", ["y", "scale", "zero"], ["r"], name="quant"),
             helper.make_node("Identity", ["gate"], ["g"], name="copy")]
    graph = helper.make_graph(
        nodes, "board_fixture",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("gate", TensorProto.INT8, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("r", TensorProto.INT8, [1, 8]),
         helper.make_tensor_value_info("g", TensorProto.INT8, [4])],
        [numpy_helper.from_array(W.reshape(1, 8), "w"), numpy_helper.from_array(np.array(B), "b"),
         numpy_helper.from_array(np.array(SCALE), "scale"), numpy_helper.from_array(np.array(0, np.int8), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_bundle(folder: Path, target: str = "cortex-m55", arena: int = ARENA, plan_arena: int | None = None,
                 skew: str = "") -> Path:
    """A C bundle folder by the contract (model.h/.c, weights.c, runner.c, model.onnx, plan.json);
    ``skew`` is C appended to y's expression (a deliberately wrong kernel)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.h").write_text(MODEL_H.format(arena=arena))
    (folder / "model.c").write_text(MODEL_C.replace("{skew}", skew))
    (folder / "weights.c").write_text(WEIGHTS_C)
    (folder / "runner.c").write_text(RUNNER_C)
    onnx.save(fixture_model(), str(folder / "model.onnx"))
    plan = {"schema": "lmc.plan/1", "target": target, "alignment": 16,
            "arena_bytes": arena if plan_arena is None else plan_arena, "schedule": ["mul", "tanh", "add", "quant"]}
    (folder / "plan.json").write_text(json.dumps(plan))
    return folder


def expected(x: np.ndarray, gate: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = (np.tanh(x * W) + B).astype(np.float32)
    r = np.clip(np.rint(y / SCALE), -128, 127).astype(np.int8)
    return y, r, gate
