"""--max-ram fits instead of only refusing: exact means first, quantization only with --allow-approx."""

from __future__ import annotations

from pathlib import Path

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
