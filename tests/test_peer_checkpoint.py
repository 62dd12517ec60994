"""bench/peer_checkpoint.py: a transformers checkpoint rebuilt from an optimum Llama export gives the export's
logits, and its check catches wrong weights (swapped projections) and a wrong rotary base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import peer_checkpoint  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "llama-past-optimum.onnx"


def test_rebuilt_checkpoint_gives_the_exports_logits(tmp_path):
    done = peer_checkpoint.rebuild(FIXTURE, tmp_path / "ckpt")
    assert done.max_abs_diff is not None and done.max_abs_diff <= 1e-4
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["intermediate_size"], config["vocab_size"]) == (2, 4, 2, 16, 128, 256)
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"model.safetensors", "tokenizer.json"}
    assert not (tmp_path / "ckpt.partial").exists()


def test_swapped_projections_fail_the_check(tmp_path, monkeypatch):
    name = peer_checkpoint.checkpoint_name

    def swapped(op, node, initializer):
        mapped = name(op, node, initializer)
        if mapped and ("gate_proj" in mapped[0] or "up_proj" in mapped[0]):
            other = mapped[0].replace("gate_proj", "@").replace("up_proj", "gate_proj").replace("@", "up_proj")
            return other, mapped[1]
        return mapped

    monkeypatch.setattr(peer_checkpoint, "checkpoint_name", swapped)
    with pytest.raises(AssertionError, match="differ from the export"):
        peer_checkpoint.rebuild(FIXTURE, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_wrong_rope_theta_fails_the_check(tmp_path):
    with pytest.raises(AssertionError, match="differ from the export"):
        peer_checkpoint.rebuild(FIXTURE, tmp_path / "ckpt", rope_theta=50.0)


def test_norm_scales_shared_through_identity_nodes(tmp_path):
    """The exporter shares equal scales as one initializer behind Identity nodes: each Mul still gets its own."""
    model = onnx.load(str(FIXTURE))
    inits = {t.name: t for t in model.graph.initializer}
    shared = "model.layers.0.input_layernorm.weight"
    value = numpy_helper.to_array(inits[shared])
    for i, node in enumerate(list(model.graph.node)):
        if node.op_type == "Mul" and node.name.endswith("layernorm/Mul_1") and shared not in node.input:
            scale = next(x for x in node.input if x in inits)
            inits[scale].CopyFrom(numpy_helper.from_array(value, scale))      # equal values, as at initialisation
            alias = f"{scale}_shared"
            node.input[list(node.input).index(scale)] = alias
            model.graph.node.insert(0, helper.make_node("Identity", [shared], [alias], name=f"Identity_{i}"))
    used = {x for n in model.graph.node for x in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path))
    done = peer_checkpoint.rebuild(path, tmp_path / "ckpt")
    assert done.max_abs_diff <= 1e-4
    assert done.tensors == 3 + 9 * 2 - 1


def test_an_unmapped_weight_is_refused(tmp_path, monkeypatch):
    name = peer_checkpoint.checkpoint_name
    monkeypatch.setattr(peer_checkpoint, "checkpoint_name",
                        lambda op, node, init: None if "layers.1/mlp/down_proj" in node else name(op, node, init))
    with pytest.raises(ValueError, match="19 weights mapped, a Llama of this shape has 20"):
        peer_checkpoint.rebuild(FIXTURE, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
