"""Structured pruning (passes/prune.py, prune_sites.py, prune_fit.py) on the tiny Llama (4 query heads on 2
key/value heads, MLP 128, 2 layers): the pruned graph runs, shapes and Reshape targets follow, the refit
lowers the output error, and what cannot be pruned soundly is refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from helpers import run_ort
from lmc.compiler.build import build
from lmc.compiler.cli import main
from lmc.compiler.compilation import BuildOptions, Compilation
from lmc import generate
from lmc.compiler.pipeline import default_pipeline
from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.core.pass_manager import PassContext
from lmc.models import build_llama
from lmc.models.llama import LlamaConfig
from lmc.passes import prune as prune_pass
from lmc.passes import prune_fit
from lmc.passes.prune import Prune, PruneConfig, PruneSpec
from lmc.targets.target import load_target

SEQ = 16
CFG = LlamaConfig()


def _fused(cfg: LlamaConfig = CFG) -> gs.Graph:
    options = BuildOptions(target="x86-64", input_shapes={"input_ids": (1, SEQ)})
    target = load_target("x86-64")
    graph = ir.to_graph(build_llama(cfg))
    shapes.bind_input_shapes(graph, {"input_ids": (1, SEQ)})
    shapes.infer_shapes(graph)
    graph, _ = Compilation(options, target).run(graph, default_pipeline(options, target, ["input_ids"]))
    return graph


def _feeds(n: int = 8, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, CFG.vocab, (1, SEQ), dtype=np.int64)} for _ in range(n)]


def _prune(graph: gs.Graph, text: str, per_layer: bool = False, feeds=None) -> tuple[gs.Graph, Prune, list]:
    graph = ir.to_graph(ir.to_model(graph))      # a copy: the fused original stays as it was
    p = Prune(PruneConfig(PruneSpec.parse(text, per_layer), feeds or _feeds()))
    options = BuildOptions(target="x86-64", input_shapes={"input_ids": (1, SEQ)})
    graph, records = Compilation(options, load_target("x86-64")).run(graph, [p])
    return graph, p, records


@pytest.fixture(scope="module")
def fused() -> gs.Graph:
    return _fused()


def _matmul_weight(graph: gs.Graph, what: str) -> list[list[int]]:
    """Shapes of the MatMul weights named blocks.<i>.<what> (pruned copies are named <name>_pruned)."""
    return [list(n.inputs[1].shape) for n in graph.nodes if ir.is_op(n, "MatMul") and isinstance(n.inputs[1], gs.Constant)
            and n.inputs[1].name.split("_pruned")[0].endswith("." + what)]


def run_graph(graph: gs.Graph, feed: dict) -> list[np.ndarray]:
    return run_ort(ir.to_model(graph), feed)


def _logits_error(original: gs.Graph, pruned: gs.Graph, feeds) -> float:
    """Mean squared logits difference over ``feeds`` (one session per graph, the feeds as one batch)."""
    ids = {"input_ids": np.concatenate([f["input_ids"] for f in feeds])}
    a, b = ir.to_model(original), ir.to_model(pruned)
    return float(np.mean([np.mean((run_ort(a, {"input_ids": r[None]})[0] - run_ort(b, {"input_ids": r[None]})[0]) ** 2)
                          for r in ids["input_ids"]]))


def test_spec_parses_fractions_and_refuses_nonsense():
    spec = PruneSpec.parse("mlp=0.2,heads=1/3")
    assert spec.mlp == pytest.approx(0.2) and spec.heads == pytest.approx(1 / 3) and spec.kv == 0
    assert spec.compensate and spec.saliency is prune_pass.Saliency.MEASURED
    assert not PruneSpec.parse("mlp=0.1,refit=off,choose=magnitude").compensate
    for bad in ("mlp=1", "mlp=-0.1", "mlp=x", "depth=0.2", "mlp", "mlp=0", "heads=0.2,choose=random"):
        with pytest.raises(LmcError):
            PruneSpec.parse(bad)


def test_options_refuse_prune_without_calib():
    with pytest.raises(LmcError, match="--calib"):
        BuildOptions(prune="mlp=0.2")
    with pytest.raises(LmcError, match="--prune"):
        BuildOptions(prune_per_layer=True)
    assert "prune mlp=0.2" in BuildOptions(prune="mlp=0.2", calib="c.npz").approximations[0]


def test_mlp_and_heads_shapes_follow_and_the_graph_runs(fused):
    graph, p, records = _prune(fused, "mlp=0.25,heads=0.5", per_layer=True)
    head_dim = CFG.d_model // CFG.heads
    assert _matmul_weight(graph, "down") == [[96, CFG.d_model]] * CFG.layers
    assert _matmul_weight(graph, "gate") == [[CFG.d_model, 96]] * CFG.layers
    assert _matmul_weight(graph, "q") == [[CFG.d_model, 2 * head_dim]] * CFG.layers    # one query head per group
    assert _matmul_weight(graph, "k") == [[CFG.d_model, 2 * head_dim]] * CFG.layers    # both groups stay
    assert _matmul_weight(graph, "o") == [[2 * head_dim, CFG.d_model]] * CFG.layers
    attention = [n for n in graph.nodes if ir.is_op(n, "Attention", "")]
    assert [list(n.inputs[0].shape)[1] for n in attention] == [2] * CFG.layers
    targets = [ir.const_value(n.inputs[1]).tolist() for n in graph.nodes if ir.is_op(n, "Reshape")]
    assert [1, SEQ, 2, head_dim] in targets and [1, SEQ, 2 * head_dim] in targets
    assert all(t[-1] != CFG.d_model for t in targets if len(t) == 3)      # no merge to the old width is left
    out = run_graph(graph, _feeds(1)[0])[0]
    assert out.shape == (1, SEQ, CFG.vocab) and np.isfinite(out).all()
    record = records[-1]
    assert record.approximation.startswith("prune mlp=0.25")
    assert record.stats["mlp_channels_removed"] == 2 * 32 and record.stats["query_heads_removed"] == 2 * 2
    assert len(record.notes) == 2 * CFG.layers and all("output error" in n for n in record.notes)


def test_whole_kv_groups_go_with_their_query_heads(fused):
    graph, p, _ = _prune(fused, "kv=0.5", per_layer=True)
    head_dim = CFG.d_model // CFG.heads
    assert _matmul_weight(graph, "k") == [[CFG.d_model, head_dim]] * CFG.layers
    assert _matmul_weight(graph, "v") == [[CFG.d_model, head_dim]] * CFG.layers
    assert _matmul_weight(graph, "q") == [[CFG.d_model, 2 * head_dim]] * CFG.layers
    attention = [n for n in graph.nodes if ir.is_op(n, "Attention", "")]
    assert [(n.inputs[0].shape[1], n.inputs[1].shape[1]) for n in attention] == [(2, 1)] * CFG.layers
    assert np.isfinite(run_graph(graph, _feeds(1)[0])[0]).all()
    assert all("1 of 2 key/value groups" in r.removed for r in p.reports)


def test_global_choice_counts_over_all_layers(fused):
    _, p, records = _prune(fused, "mlp=0.3")
    # 77 of 256 channels asked; they go in groups of 32 (the int4 block): the nearest multiple, 64
    assert records[-1].stats["mlp_channels_removed"] == 64
    _, p, records = _prune(fused, "heads=0.5")           # 4 of 8 query heads, in steps of one per group
    assert records[-1].stats["query_heads_removed"] == 4


def test_refit_lowers_the_output_error_on_the_calibration_data(fused, monkeypatch):
    feeds = _feeds()
    plain, _, _ = _prune(fused, "mlp=0.4,heads=0.5,refit=off", per_layer=True, feeds=feeds)
    fitted, p, _ = _prune(fused, "mlp=0.4,heads=0.5", per_layer=True, feeds=feeds)
    e_plain, e_fit = _logits_error(fused, plain, feeds), _logits_error(fused, fitted, feeds)
    assert e_fit < e_plain
    assert all(r.rel_error <= r.rel_error_plain for r in p.reports)
    assert any(r.rel_error < 0.9 * r.rel_error_plain for r in p.reports)

    # broken: a "refit" that perturbs the kept rows instead — the same check catches it
    real = prune_fit.refit

    def broken(gram, weight, keep, compensate=True, damp=prune_fit.DAMP):
        fit = real(gram, weight, keep, False)
        noise = np.random.default_rng(0).standard_normal(fit.weight.shape).astype(fit.weight.dtype)
        return dataclasses.replace(fit, weight=fit.weight + 0.5 * noise * np.abs(fit.weight).mean())

    monkeypatch.setattr(prune_pass, "refit", broken)
    wrong, _, _ = _prune(fused, "mlp=0.4,heads=0.5", per_layer=True, feeds=feeds)
    assert not _logits_error(fused, wrong, feeds) < e_plain


def test_measured_saliency_beats_magnitude_here(fused):
    feeds = _feeds()
    measured, _, _ = _prune(fused, "mlp=0.4,refit=off", feeds=feeds)
    magnitude, _, _ = _prune(fused, "mlp=0.4,refit=off,choose=magnitude", feeds=feeds)
    assert _logits_error(fused, measured, feeds) < _logits_error(fused, magnitude, feeds)


def test_refusals(fused):
    with pytest.raises(LmcError, match="every query head"):     # 2 query heads per group: 0.75 → both
        _prune(fused, "heads=0.75", per_layer=True)
    with pytest.raises(LmcError, match="all 2 key/value groups"):
        _prune(fused, "kv=0.75", per_layer=True)
    with pytest.raises(LmcError, match="--calib"):
        Prune(PruneConfig(PruneSpec.parse("mlp=0.2"), [])).run(ir.to_graph(ir.to_model(fused)), PassContext())
    # the MLP's activation also read elsewhere (here: a graph output): its channels cannot be followed
    graph = ir.to_graph(ir.to_model(fused))
    act = next(n for n in graph.nodes if ir.is_op(n, "QuickGelu", ir.MS_DOMAIN) or ir.is_op(n, "Sigmoid"))
    graph.outputs.append(act.outputs[0])
    with pytest.raises(LmcError, match="also read outside the MLP|graph output"):
        _prune(graph, "mlp=0.2")
    # an attention output read by something else than the merge Reshape
    graph = ir.to_graph(ir.to_model(fused))
    att = next(n for n in graph.nodes if ir.is_op(n, "Attention", ""))
    graph.outputs.append(att.outputs[0])
    with pytest.raises(LmcError, match="cannot prune the heads"):
        _prune(graph, "heads=0.5")
    # no MLP at all: a model without one refuses mlp=
    graph = ir.to_graph(ir.to_model(fused))
    for n in graph.nodes:
        if ir.is_op(n, "QuickGelu", ir.MS_DOMAIN) or ir.is_op(n, "Mul"):
            n.op = "Max" if n.op == "Mul" else n.op
    with pytest.raises(LmcError, match="no MLP|cannot prune"):
        _prune(graph, "mlp=0.2")


def test_refit_math_matches_the_samples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))      # correlated features
    w = rng.standard_normal((12, 5))
    gram = x.T @ x / len(x)
    keep = np.array([0, 2, 3, 5, 7, 8, 11])
    fit = prune_fit.refit(gram, w, keep, damp=0.0)
    direct = np.linalg.lstsq(x[:, keep], x @ w, rcond=None)[0]
    np.testing.assert_allclose(fit.weight, direct, rtol=1e-6, atol=1e-8)
    err = np.linalg.norm(x @ w - x[:, keep] @ fit.weight) / np.linalg.norm(x @ w)
    plain = np.linalg.norm(x @ w - x[:, keep] @ w[keep]) / np.linalg.norm(x @ w)
    assert fit.rel_error == pytest.approx(err, rel=1e-6) and fit.rel_error_plain == pytest.approx(plain, rel=1e-6)
    assert fit.rel_error < fit.rel_error_plain
    scores = prune_fit.measured_saliency(gram, w, 1)
    np.testing.assert_allclose(scores, (x ** 2).mean(axis=0) * (w ** 2).sum(axis=1), rtol=1e-9)


def test_cli_build_with_prune_writes_an_approximate_bundle_that_verify_names(tmp_path, model_dir, capsys):
    feeds = _feeds(4)
    np.savez(tmp_path / "calib.npz", input_ids=np.concatenate([f["input_ids"] for f in feeds]))
    out = tmp_path / "out"
    code, _, err = _cli(["build", str(model_dir / "tiny-llama.onnx"), "--target", "x86-64", "--input-shape",
                         f"input_ids=1x{SEQ}", "--prune", "mlp=0.25,heads=0.5", "--calib", str(tmp_path / "calib.npz"),
                         "--quantize", "int8", "-o", str(out)], capsys)
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "output error" in report and report.count(" of 128 channels") == CFG.layers
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert meta["lmc.prune"].startswith("mlp=0.25,heads=0.5")
    code, said, _ = _cli(["verify", str(out), "--against", str(model_dir / "tiny-llama.onnx")], capsys)
    assert code == 3 and "built with --quantize int8 and --prune mlp=0.25" in said
    code, _, err = _cli(["build", str(model_dir / "tiny-llama.onnx"), "--input-shape", f"input_ids=1x{SEQ}",
                         "--prune", "mlp=0.25", "-o", str(tmp_path / "no")], capsys)
    assert code == 2 and "--calib" in err and not (tmp_path / "no").exists()


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


GENERATION_FIXTURE = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "llama-past-optimum.onnx"


def _calib(tmp_path: Path, length: int = 16) -> str:
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=np.random.default_rng(3).integers(0, 256, (8, length)))
    return str(path)


def test_generation_build_drops_whole_kv_groups_and_its_state_shrinks(tmp_path):
    out = tmp_path / "gen"
    result = build(GENERATION_FIXTURE, BuildOptions(context=16, prune="mlp=0.25,kv=0.5", prune_per_layer=True,
                                                    calib=_calib(tmp_path)), out)
    assert any(a.startswith("prune") for a in result.approximations)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    caches = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
              if i.name.startswith("past_key_values")}
    assert caches and all(shape[1] == 1 for shape in caches.values())          # 2 key/value groups -> 1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["state"]["bytes"] == sum(4 * int(np.prod(s)) for s in caches.values())
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all({a.name: a.i for a in n.attribute if a.name in ("num_heads", "kv_num_heads")} ==
               {"num_heads": 2, "kv_num_heads": 1} for n in gqa)
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    run = generate(out, [1, 42, 7, 99], max_new_tokens=6)
    assert len(run.tokens) == 6


def test_generation_build_with_layers_pruned_unevenly_writes_no_genai_config(tmp_path):
    out = tmp_path / "gen"
    build(GENERATION_FIXTURE, BuildOptions(context=16, prune="heads=0.25", calib=_calib(tmp_path), verify=False), out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    heads = sorted(a.i for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
                   if a.name == "num_heads")
    assert heads == [2, 4]                       # one query head of each group, from one layer only
    assert not (out / "genai_config.json").exists()
    assert "different numbers of heads" in (out / "report.md").read_text()


def test_max_ram_with_allow_approx_tries_pruning_last_and_only_with_calib():
    from lmc.compiler.build import FITTING_PRUNES, fitting_candidates

    target = load_target("cortex-a55")
    found = fitting_candidates(BuildOptions(calib="c.npz"), True, target)
    assert [o.prune for _, o in found[-len(FITTING_PRUNES):]] == list(FITTING_PRUNES)
    assert all(o.quantize.value != "none" for _, o in found[-len(FITTING_PRUNES):])     # pruned, then quantized
    assert not any(o.prune for _, o in fitting_candidates(BuildOptions(), True, target))
    assert not any(o.prune for _, o in fitting_candidates(BuildOptions(calib="c.npz"), False, target))


def test_global_fractions_a_layer_cannot_give_are_refused(fused):
    with pytest.raises(LmcError, match="under 25% of their channels"):
        _prune(fused, "mlp=0.9")
    with pytest.raises(LmcError, match="cannot be met"):      # 2 query heads per group: at most 1 of 2 can go
        _prune(fused, "heads=0.9")


def test_a_damped_refit_never_leaves_a_site_worse_than_no_refit():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8))
    w = rng.standard_normal((8, 3))
    gram = x.T @ x / len(x)
    keep = np.array([0, 1, 2, 5])
    fit = prune_fit.refit(gram, w, keep, damp=1e6)       # damping this strong shrinks the refit towards zero
    np.testing.assert_array_equal(fit.weight, w[keep])
    assert fit.rel_error == fit.rel_error_plain
    # the guarded case: the damped solution itself is worse than keeping the rows as they are
    gkk = gram[np.ix_(keep, keep)]
    damped = np.linalg.solve(gkk + 1e6 * np.mean(np.diag(gkk)) * np.eye(len(keep)), gram[keep] @ w)
    worse = np.linalg.norm(x @ w - x[:, keep] @ damped) / np.linalg.norm(x @ w)
    assert worse > fit.rel_error_plain


def test_encoder_decoder_builds_refuse_prune(tmp_path, capsys):
    t5 = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "seq2seq" / "t5-small"
    code, _, err = _cli(["build", str(t5), "--context", "16", "--prune", "mlp=0.2", "--calib", _calib(tmp_path),
                         "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "encoder–decoder bundles do not support --prune mlp=0.2" in err
    assert not (tmp_path / "out").exists()


def _gqa_graph(extra_cache_reader: bool = False) -> gs.Graph:
    """A generation-shaped GroupQueryAttention (4 query heads on 2 key/value heads of 16, packed q/k/v)."""
    d, n = 64, 16
    x = gs.Variable("x", np.float32, [1, 3, d])
    past_k = gs.Variable("past_key_values.0.key", np.float32, [1, 2, n, 16])
    past_v = gs.Variable("past_key_values.0.value", np.float32, [1, 2, n, 16])
    seqlens, total = gs.Variable("seqlens_k", np.int32, [1]), gs.Variable("total", np.int32, [])
    qkv, out = gs.Variable("qkv", np.float32, [1, 3, 128]), gs.Variable("attn", np.float32, [1, 3, d])
    pk, pv = gs.Variable("present.0.key", np.float32, [1, 2, n, 16]), gs.Variable("present.0.value", np.float32, [1, 2, n, 16])
    y = gs.Variable("y", np.float32, [1, 3, d])
    rng = np.random.default_rng(0)
    nodes = [gs.Node("MatMul", inputs=[x, gs.Constant("w_qkv", rng.standard_normal((d, 128)).astype(np.float32))], outputs=[qkv]),
             gs.Node("GroupQueryAttention", domain="com.microsoft", attrs={"num_heads": 4, "kv_num_heads": 2},
                     inputs=[qkv, gs.Variable.empty(), gs.Variable.empty(), past_k, past_v, seqlens, total],
                     outputs=[out, pk, pv]),
             gs.Node("MatMul", inputs=[out, gs.Constant("w_o", rng.standard_normal((d, d)).astype(np.float32))], outputs=[y])]
    outputs = [y, pk, pv]
    if extra_cache_reader:
        seen = gs.Variable("seen", np.float32, [1, 2, n, 16])
        nodes.append(gs.Node("Identity", inputs=[past_k], outputs=[seen]))
        outputs.append(seen)
    return gs.Graph(nodes=nodes, inputs=[x, past_k, past_v, seqlens, total], outputs=outputs, opset=21)


def test_group_query_attention_sites_follow_the_packed_projection_and_the_cache():
    from lmc.passes.prune_sites import find_sites, kept_indices

    _, (site,) = find_sites(_gqa_graph(), mlp=False, heads=True)
    assert (site.heads, site.kv_heads, site.head_dim, site.reader.inputs[1].name) == (4, 2, 16, "w_o")
    (cut,) = site.cuts
    assert cut.layout == [("q", 16, 4), ("kv", 16, 2), ("kv", 16, 2)]
    cols = kept_indices(cut.layout, {"q": np.array([2, 3]), "kv": np.array([1])})   # the second group kept
    assert cols.tolist() == list(range(32, 64)) + list(range(80, 96)) + list(range(112, 128))
    assert {d.tensor.name for d in site.dims if d.layout == [("kv", 1, 2)]} == \
        {"past_key_values.0.key", "past_key_values.0.value", "present.0.key", "present.0.value"}
    with pytest.raises(LmcError, match="cache past_key_values.0.key is not a graph input read by it alone"):
        find_sites(_gqa_graph(extra_cache_reader=True), mlp=False, heads=True)
