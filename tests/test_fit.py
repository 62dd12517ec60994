"""--max-ram fits instead of only refusing: exact means first, quantization only with --allow-approx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from lmc.compiler.build import BudgetExceeded, BuildOptions, build
from lmc.models import LlamaConfig, build_llama

TARGETS = Path(__file__).resolve().parents[1] / "targets"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fit") / "llama.onnx"
    onnx.save(build_llama(LlamaConfig(max_positions=512)), str(path))
    return path


def _options(**kw) -> BuildOptions:
    return BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 512)}, **kw)


def test_exact_means_fit_and_are_reported(llama, tmp_path):
    dense = build(llama, _options(), tmp_path / "d")
    budget = dense.plan.peak_ram_bytes // 2
    fitted = build(llama, _options(max_ram=budget), tmp_path / "f")
    assert fitted.plan.peak_ram_bytes <= budget and fitted.fitted.startswith("--in-place")
    assert fitted.verification.passed and not fitted.verification.to_dict().get("approximate")


def test_impossible_budget_names_the_best_attempt_and_what_makes_it(llama, tmp_path):
    with pytest.raises(BudgetExceeded, match=r"the best, .* plans .* made of inputs \+ outputs") as exc:
        build(llama, _options(max_ram=256 * 1024), tmp_path / "x")
    assert "--allow-approx would also try quantization" in str(exc.value)
    assert not (tmp_path / "x").exists()


def test_quantization_only_with_allow_approx(llama, tmp_path):
    ram = (TARGETS / "x86_64.toml").read_text().replace('weights_placement = "mmap"', 'weights_placement = "ram"')
    target = tmp_path / "ram.toml"
    target.write_text(ram.replace('name = "x86-64"', 'name = "x86-64-ram"'))
    from lmc.compiler.build import QuantizeMode

    best = dict(target=str(target), input_shapes={"input_ids": (1, 512)}, inplace=True, attention="chunked:64")
    exact = build(llama, BuildOptions(**best), tmp_path / "e")
    int8 = build(llama, BuildOptions(**best, quantize=QuantizeMode.INT8), tmp_path / "i8")
    budget = int8.plan.peak_ram_bytes                     # int8 weights in RAM fit; the exact ones do not
    assert exact.plan.peak_ram_bytes > budget
    opts = BuildOptions(target=str(target), input_shapes={"input_ids": (1, 512)}, max_ram=budget)
    with pytest.raises(BudgetExceeded):
        build(llama, opts, tmp_path / "no")
    import dataclasses
    fitted = build(llama, dataclasses.replace(opts, allow_approx=True), tmp_path / "q")
    assert fitted.fitted.endswith("--quantize int8") and fitted.plan.peak_ram_bytes <= budget


def test_the_targets_preferred_quantization_is_tried_first():
    """cortex-m55 prefers w8a8 (int8 activations shrink the arena; weight-only int8 does not): with
    calibration data it comes first, without it w8a8 cannot run and the error-ordered list stays."""
    from lmc.compiler.build import QuantizeMode, fitting_candidates
    from lmc.targets.target import load_target

    m55, x86 = load_target("cortex-m55"), load_target("x86-64")
    opts = BuildOptions(target="cortex-m55", input_shapes={"input_ids": (1, 8)}, calib="calib.npz")
    modes = [o.quantize for _, o in fitting_candidates(opts, True, m55)
             if o.quantize is not QuantizeMode.NONE and o.prune is None]     # (pruning comes after, on the last)
    assert modes == [QuantizeMode.W8A8, QuantizeMode.INT8, QuantizeMode.INT4]
    assert [o.quantize for _, o in fitting_candidates(opts, True, x86) if o.prune is None][-3:] == [
        QuantizeMode.INT8, QuantizeMode.W8A8, QuantizeMode.INT4]
    plain = BuildOptions(target="cortex-m55", input_shapes={"input_ids": (1, 8)})
    assert [o.quantize for _, o in fitting_candidates(plain, True, m55)][-2:] == [QuantizeMode.INT8, QuantizeMode.INT4]
    assert all(o.quantize is QuantizeMode.NONE for _, o in fitting_candidates(opts, False, m55))


def test_int4_blocks_default_to_the_targets(llama, tmp_path):
    """--block-size unset: the target file's int4_block_size; given, it wins; bad values are one-line errors."""
    from lmc.compiler.build import QuantizeMode
    from lmc.core.errors import LmcError, TargetError
    from lmc.targets.target import load_target

    text = (TARGETS / "x86_64.toml").read_text().replace("int4_block_size = 64", "int4_block_size = 16")
    target = tmp_path / "b16.toml"
    target.write_text(text.replace('name = "x86-64"', 'name = "x86-64-b16"').replace("int4_block_size_gptq = 128", ""))

    def blocks(out, **kw):
        build(llama, BuildOptions(target=str(target), input_shapes={"input_ids": (1, 16)}, quantize=QuantizeMode.INT4,
                                  verify=False, **kw), out)
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        four_bit = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                    or (n.op_type == "MatMulNBits" and any(a.name == "bits" and a.i == 4 for a in n.attribute))]
        return {a.i for n in four_bit for a in n.attribute if a.name == "block_size"}

    assert blocks(tmp_path / "t") == {16}
    assert blocks(tmp_path / "u", block_size=64) == {64}
    # with calibration data (GPTQ) the target's int4_block_size_gptq, when it names one; --block-size still wins
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int64))
    assert blocks(tmp_path / "c", calib=str(calib)) == {16}          # this file names none: int4_block_size
    target.write_text(target.read_text().replace("int4_block_size = 16", "int4_block_size = 16\nint4_block_size_gptq = 32"))
    assert load_target(str(target)).tuning.int4_block(gptq=True) == 32
    assert blocks(tmp_path / "g", calib=str(calib)) == {32}
    assert blocks(tmp_path / "h", calib=str(calib), block_size=64) == {64}
    with pytest.raises(LmcError, match="--block-size must be a power of two"):
        BuildOptions(block_size=24)
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("int4_block_size = 16", "int4_block_size = 24"))
    with pytest.raises(TargetError, match="int4_block_size"):
        load_target(str(bad))
    bad.write_text(text.replace("int4_block_size_gptq = 128", "int4_block_size_gptq = 96"))
    with pytest.raises(TargetError, match="int4_block_size_gptq"):
        load_target(str(bad))
    bad.write_text(text.replace('preferred_quantization = "int8"', 'preferred_quantization = "fp8"'))
    with pytest.raises(TargetError, match="preferred_quantization"):
        load_target(str(bad))
