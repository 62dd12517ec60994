"""The resident-memory reader of the target worker (``lmc/compiler/target_worker.py``): the guest's bytes are
the smaps Rss of the ranges /proc/self/maps lists, the rest is the emulator's. On the host maps and smaps
list the same ranges, so the guest is all of it; a mapping left out of the maps text (as qemu leaves out its
own) moves to the emulator. The ``memory`` task measures a model's weights on the host, and under qemu-user
(skipped without scripts/setup-aarch64.sh's environment) keeps the emulator's bytes out of the guest's."""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.compiler import target_worker as tw
from lmc.compiler.on_target import find_emulator, run_worker
from lmc.core.errors import LmcError

MAPS = """00400000-00500000 r-xp 00000000 08:01 1 /usr/bin/python3.11
00500000-00600000 rw-p 00000000 00:00 0
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
"""
SMAPS = """00400000-00500000 r-xp 00000000 08:01 1 /usr/bin/python3.11
Size:               1024 kB
Rss:                 400 kB
00500000-00600000 rw-p 00000000 00:00 0
Rss:                1024 kB
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Rss:                2048 kB
7f0000200000-7f0000300000 r--p 00000000 08:01 2 /opt/x/libonnxruntime.so.1
Rss:                 100 kB
7ff800000000-7ff800100000 r-xp 00000000 08:01 3 /usr/bin/qemu-aarch64-static
Rss:                 512 kB
"""


def test_guest_is_the_rss_of_the_ranges_maps_lists():
    split = tw.resident_split(MAPS, SMAPS, kinds=True)
    # the interpreter and the anonymous mapping whole, half of the one that straddles the guest's border
    assert split["guest"] == (400 + 1024 + 1024) * 1024
    assert split["emulator"] == (1024 + 100 + 512) * 1024
    assert split["straddling"] == 2048 * 1024
    assert split["kinds"] == {"other": 400 * 1024, "anonymous": 2048 * 1024}


def test_maps_that_change_across_the_smaps_read_are_read_again(monkeypatch):
    """The guest released the emulator-bound range 7ff8… while smaps was read: the first maps text still
    lists it, the second does not; counting against the first would give the emulator's 512 kB to the guest."""
    stale = MAPS + "7ff800000000-7ff800100000 rw-p 00000000 00:00 0\n"
    texts = iter([stale, SMAPS, MAPS, SMAPS, MAPS])
    monkeypatch.setattr(tw, "_read", lambda path: next(texts))
    split = tw.resident()
    assert split["retries"] == 1 and split["guest"] == (400 + 1024 + 1024) * 1024


def test_touching_ranges_merge():
    text = "1000-2000 r--p 0 0:0 0\n2000-3000 r--p 0 0:0 0\n5000-6000 r--p 0 0:0 0\n"
    assert tw.mapped_ranges(text) == [(0x1000, 0x3000), (0x5000, 0x6000)]


def _texts() -> tuple[str, str]:
    with open("/proc/self/maps") as f:
        maps_text = f.read()
    with open("/proc/self/smaps") as f:
        smaps_text = f.read()
    return maps_text, smaps_text


def test_on_the_host_the_guest_is_the_whole_process():
    maps_text, smaps_text = _texts()
    split = tw.resident_split(maps_text, smaps_text)
    total = sum(int(n) * 1024 for n in re.findall(r"^Rss:\s+(\d+) kB", smaps_text, re.M))
    assert split["guest"] == total and split["emulator"] == 0 and split["straddling"] == 0
    assert abs(tw.resident()["guest"] - tw.status_bytes("VmRSS")) < 0.05 * tw.status_bytes("VmRSS")


def test_a_mapping_maps_leaves_out_is_the_emulators():
    """The deliberately broken case: a 16 MiB mapping this process touched, removed from the maps text —
    as qemu leaves its own mappings out — is counted as the emulator's, not the guest's."""
    size = 16 << 20
    block = mmap.mmap(-1, size)
    block.write(b"\1" * size)
    address = np.frombuffer(block, np.uint8).ctypes.data
    maps_text, smaps_text = _texts()
    line = next(row for row in maps_text.splitlines()
                if int(row.split("-")[0], 16) <= address < int(row.split()[0].split("-")[1], 16))
    whole = tw.resident_split(maps_text, smaps_text)
    without = tw.resident_split(maps_text.replace(line + "\n", ""), smaps_text)
    assert without["emulator"] - whole["emulator"] >= size
    assert whole["guest"] - without["guest"] >= size
    block.close()


def _weights_model(path: Path, nbytes: int) -> Path:
    """y = x + W (x of shape [1], as the empty-feed zeros are), W a constant of ``nbytes`` the session holds
    resident."""
    n = nbytes // 4
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal(n).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _memory(model: Path, emulator=None) -> dict:
    (result,), _, _ = run_worker([{"kind": "memory", "id": "m", "model": str(model), "threads": 1, "runs": 1,
                                   "interval": 0.1}], {}, emulator)
    assert "error" not in result, result
    return result


def test_the_memory_task_measures_a_models_weights_on_the_host(tmp_path):
    small = _memory(_weights_model(tmp_path / "small.onnx", 4096))
    large = _memory(_weights_model(tmp_path / "large.onnx", 24 << 20))
    # 24 MiB of weights and an output of as many bytes, both resident at the end; at most a copy more
    assert 2 * (24 << 20) <= large["peak"] - small["peak"] <= 3 * (24 << 20)
    assert large["emulator_before"] == large["emulator_after"] == 0 and large["hwm_reset"]
    # on the host VmHWM is exact: the sampled peak is at most it, and near it (the weights stay resident)
    assert large["hwm_low"] == large["hwm_high"] and 0.95 * large["hwm_high"] <= large["peak"] <= large["hwm_high"]


def test_under_qemu_the_emulators_bytes_stay_out(tmp_path):
    try:
        emulator = find_emulator("cortex-a76")
    except LmcError as exc:
        pytest.skip(str(exc))
    result = _memory(_weights_model(tmp_path / "large.onnx", 24 << 20), emulator)
    # qemu's binary, heap and translated code are resident beside the guest, and grow as it translates
    assert result["emulator_before"] > 8 << 20 and result["emulator_after"] > result["emulator_before"]
    assert result["straddling"] == 0 and result["samples"] >= 2
    assert 24 << 20 <= result["peak"] <= 3 * (24 << 20) + (16 << 20)
    assert result["peak"] <= result["hwm_high"]
