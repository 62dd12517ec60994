"""lmc verify --on aarch64: bundles and their originals run on the target's instruction set (qemu-user, the
environment scripts/setup-aarch64.sh prepares) and are judged as on the host — a broken bundle fails there
(exit 3). The worker is also checked under the host's Python (same numbers as lmc verify), which needs no
emulator; the emulated tests skip when the environment is missing."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lmc.compiler.build import BuildOptions, build
from lmc.compiler.cli import main
from lmc.core.errors import LmcError
from lmc.compiler.on_target import ENV_VAR, SETUP, find_emulator, verify_on
from lmc.compiler.verify import verify
from lmc.targets.target import host_isa

FIXTURE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "llama-past-optimum.onnx"


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def bundles(model_dir, tmp_path_factory):
    """A one-shot bundle of tiny-llama and a generation bundle of the optimum fixture (cortex-a55), each with
    a copy whose largest weight is scaled (a bundle that computes something else)."""
    d = tmp_path_factory.mktemp("on-target")
    one = model_dir / "tiny-llama.onnx"
    build(one, BuildOptions(target="cortex-a55", input_shapes={"input_ids": (1, 16)}), d / "one")
    build(FIXTURE, BuildOptions(target="cortex-a55", context=32), d / "gen")
    for name in ("one", "gen"):
        _broken_copy(d / name, d / f"{name}-broken")
    return {"one": (d / "one", one), "gen": (d / "gen", FIXTURE),
            "one-broken": (d / "one-broken", one), "gen-broken": (d / "gen-broken", FIXTURE)}


def _broken_copy(bundle: Path, dst: Path) -> None:
    shutil.copytree(bundle, dst)
    model = onnx.load(str(dst / "model.onnx"))
    init = max((t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
               key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5 + 0.01, init.name))
    (dst / "model.weights").unlink()
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.weights", size_threshold=1024)


def _tokens(path: Path, vocab: int, n: int) -> Path:
    np.random.default_rng(3).integers(0, vocab, n).astype("<u2").tofile(str(path))
    return path


@pytest.fixture(scope="module")
def emulator():
    try:
        return find_emulator("cortex-a76")
    except LmcError as exc:
        pytest.skip(str(exc))         # it names scripts/setup-aarch64.sh


# --- the worker under the host's Python: the host check's numbers (exact bundles: prepacking, which the target
# check keeps on and the host check turns off, changes none of their kernels on AVX2), no emulator needed -------------

@pytest.mark.parametrize("kind", ["one", "gen"])
def test_the_worker_on_the_host_reproduces_lmc_verify(bundles, kind):
    bundle, original = bundles[kind]
    ours = verify_on(bundle, original, on="host")
    theirs = verify(bundle, original)
    assert ours.passed and theirs.passed and ours.machine == platform.machine() and not ours.emulator_cpu
    assert [o.name for o in ours.outputs] == [o.name for o in theirs.outputs]
    # on AVX-512, MLAS's SGEMM over a prepacked weight and over an unpacked one round apart: errors of an ulp
    exact = "avx512f" not in host_isa().features
    for a, b in zip(ours.outputs, theirs.outputs):
        assert a.max_abs == b.max_abs if exact else abs(a.max_abs - b.max_abs) <= 1e-6
        assert a.cosine == pytest.approx(b.cosine, abs=1e-12)
    assert all(a == n > 0 for a, n in ours.top1.values())


@pytest.mark.parametrize("kind", ["one-broken", "gen-broken"])
def test_a_broken_bundle_fails_through_the_worker(bundles, kind):
    report = verify_on(*bundles[kind], on="host")
    assert not report.passed and report.max_rel > 1e-2


def test_missing_environment_is_one_line_exit_2_naming_the_script(bundles, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "none"))
    bundle, original = bundles["one"]
    code, out, err = run(["verify", str(bundle), "--against", str(original), "--on", "aarch64"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and SETUP in err and not out


def test_a_target_without_emulator_cpu_is_refused(model_dir, tmp_path, capsys):
    one = model_dir / "tiny-llama.onnx"
    build(one, BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 16)}), tmp_path / "x86")
    code, _, err = run(["verify", str(tmp_path / "x86"), "--against", str(one), "--on", "aarch64"], capsys)
    assert code == 2 and "emulator" in err and len(err.strip().splitlines()) == 1


# --- under emulation (scripts/setup-aarch64.sh) ------------------------------------------------------------

def test_one_shot_bundle_on_aarch64(emulator, bundles, tmp_path, capsys):
    bundle, original = bundles["one"]
    tokens = _tokens(tmp_path / "t.u16", 256, 32)
    code, out, _ = run(["verify", str(bundle), "--against", str(original), "--on", "aarch64", "--json",
                        "--tokens", str(tokens), "--seq-len", "16", "--windows", "2"], capsys)
    report = json.loads(out)
    assert code == 0 and report["passed"], report
    assert report["machine"] == "aarch64" and report["emulator_cpu"] == "cortex-a76"
    assert report["outputs"][0]["spread"] is not None            # the original's spread, measured there too
    assert report["top1"]["logits"]["rate"] == 1.0
    assert abs(report["perplexity"]["relative_change"]) < 1e-4


def test_generation_bundle_on_aarch64(emulator, bundles, tmp_path, capsys):
    bundle, original = bundles["gen"]
    tokens = _tokens(tmp_path / "t.u16", 256, 64)
    code, out, _ = run(["verify", str(bundle), "--against", str(original), "--on", "aarch64", "--json",
                        "--tokens", str(tokens), "--seq-len", "32", "--windows", "2"], capsys)
    report = json.loads(out)
    assert code == 0 and report["passed"], report
    assert report["machine"] == "aarch64"
    assert [o["name"] for o in report["outputs"]] == ["logits (prefill)", "logits (decode)"]
    assert all(t["rate"] == 1.0 for t in report["top1"].values())
    assert report["perplexity"]["allowed"] >= abs(report["perplexity"]["relative_change"])


@pytest.mark.parametrize("kind", ["one-broken", "gen-broken"])
def test_a_broken_bundle_fails_on_aarch64_exit_3(emulator, bundles, capsys, kind):
    bundle, original = bundles[kind]
    code, out, err = run(["verify", str(bundle), "--against", str(original), "--on", "aarch64"], capsys)
    assert code == 3 and "FAIL" in out and "ran on aarch64" in out
    assert "verification failed" in err and len(err.strip().splitlines()) == 1
