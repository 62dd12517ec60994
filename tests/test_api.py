"""The Python API as ``import lmc`` offers it: enum options by name, one-line refusals, names help() shows."""

from __future__ import annotations

import pydoc

import pytest

import lmc


@pytest.mark.parametrize("given", ["int8", "INT8", "enum"])
def test_quantize_takes_the_cli_strings_and_the_enum(given):
    options = lmc.BuildOptions(quantize=lmc.QuantizeMode.INT8 if given == "enum" else given)
    assert options.quantize is lmc.QuantizeMode.INT8
    assert options.approximations == ["int8"]
    assert lmc.BuildOptions(quantize="none").approximations == []


def test_calib_method_takes_its_strings_and_the_enum():
    from lmc.passes.quantize.w8a8 import CalibMethod

    assert lmc.BuildOptions(calib_method=CalibMethod.ENTROPY).calib_method == "entropy"
    assert lmc.BuildOptions(calib_method="MinMax").calib_method == "minmax"


@pytest.mark.parametrize("field, value, choices", [("quantize", "int3", "none, int8, int4, w8a8"),
                                                   ("quantize", 8, "none, int8, int4, w8a8"),
                                                   ("calib_method", "median", "mse, minmax, percentile, entropy")])
def test_bad_enum_option_is_one_line_listing_the_choices(field, value, choices):
    with pytest.raises(lmc.LmcError) as exc:
        lmc.BuildOptions(**{field: value})
    message = str(exc.value)
    assert len(message.splitlines()) == 1 and choices in message and repr(value) in message


def test_help_and_dir_show_the_public_names():
    assert {"build", "BuildOptions", "QuantizeMode", "generate", "LmcError", "verify"} <= set(dir(lmc))
    assert set(lmc.__all__) <= set(dir(lmc))
    text = pydoc.render_doc(lmc, renderer=pydoc.plaintext)
    for name in ("class BuildOptions", "class QuantizeMode", "class LmcError", "build(", "generate(", "verify("):
        assert name in text, name
