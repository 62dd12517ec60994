"""Generation bundles under onnxruntime-genai (``genai_config.json``, ``lmc.compiler.genai``): its greedy search
on the bundle gives the tokens of ``lmc generate`` on the same bundle and of the original past/present loop,
its logits those of the original, for an exact, an int4, a batch-of-two and a sliding-window (ring) bundle;
what it cannot drive is said in one line and no config is written. The genai runs skip when
``onnxruntime_genai`` is not installed (``pip install -e ".[genai]"``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.compiler.cli import main
from lmc.core.errors import LmcError
from lmc.compiler.drivers import PastDecoder, StateDecoder, generation_info, greedy
from lmc.compiler.run_generation import generate

try:
    import onnxruntime_genai as og
except ImportError:                 # the optional extra is not installed: the genai runs skip
    og = None

needs_genai = pytest.mark.skipif(og is None, reason="onnxruntime-genai is not installed (pip install 'lmc[genai]')")

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"
LLAMA = FIXTURES / "llama-past-optimum.onnx"
MISTRAL_SW = FIXTURES / "families" / "mistral-sw-past-optimum.onnx"       # every layer a window of 8
CONTEXT = 32
VOCAB = 256


def _tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer folder over the fixtures' 256 ids (255 bytes + <|endoftext|> = 255)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    folder.mkdir()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet[:255])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                              "eos_token": "<|endoftext|>"}))
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("genai")
    pytest.importorskip("tokenizers")
    ids = np.random.default_rng(0).integers(0, VOCAB, (4, 16))
    np.savez(root / "calib.npz", input_ids=ids)
    specs = {
        "exact": (LLAMA, dict(tokenizer=str(_tokenizer(root / "tok")))),
        "int4": (LLAMA, dict(quantize=QuantizeMode.INT4, block_size=16, calib=str(root / "calib.npz"))),
        "batch2": (LLAMA, dict(batch=2)),
        "ring": (MISTRAL_SW, dict(prefill_chunk=4)),
    }
    out = {}
    for name, (model, extra) in specs.items():
        out[name] = root / name
        build(model, BuildOptions(target="cortex-a55", context=CONTEXT, verify=name == "exact", **extra), out[name])
    return out


def _genai(bundle: Path, prompts: list[list[int]], new_tokens: int, eos: int, pad: int = 0):
    """onnxruntime-genai's greedy search over ``prompts`` (right-padded with ``pad``), its end-of-sequence
    token set to ``eos``: (new tokens per prompt, the logits of every step [B, V])."""
    config = og.Config(str(bundle))
    config.overlay(json.dumps({"model": {"eos_token_id": eos}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    width = max(map(len, prompts))
    params.set_search_options(do_sample=False, max_length=width + new_tokens, batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([p + [pad] * (width - len(p)) for p in prompts], dtype=np.int32))
    logits = []
    while not generator.is_done():
        logits.append(np.array(generator.get_logits()).reshape(len(prompts), -1))
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(b)][width:] for b in range(len(prompts))], logits


def _reference(model: Path, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """The original's last-position logits before each of ``tokens``, driven present → past."""
    decoder = PastDecoder(model)
    out = [decoder.forward(np.array([prompt]))[0, -1]]
    for t in tokens[:-1]:
        out.append(decoder.forward(np.array([[t]]))[0, -1])
    return out


def _unused(*token_lists) -> int:
    """A token none of the lists holds: genai's end-of-sequence for the run, so it stops only at max_length."""
    seen = {t for tokens in token_lists for t in tokens}
    return next(t for t in range(VOCAB - 1, -1, -1) if t not in seen)


def test_bundle_has_the_interface_and_config_genai_reads(bundles):
    model = onnx.load(str(bundles["exact"] / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    assert "attention_mask" in inputs and "position_ids" not in inputs
    assert [d.dim_param for d in inputs["attention_mask"].type.tensor_type.shape.dim][1] == "total_sequence_length"
    assert generation_info(bundles["exact"] / "model.onnx").attention_mask == "attention_mask"
    config = json.loads((bundles["exact"] / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx" and decoder["inputs"]["attention_mask"] == "attention_mask"
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"]) == (2, 4, 2, 16)
    past = [d.dim_value for d in inputs["past_key_values.0.key"].type.tensor_type.shape.dim]
    assert past == [1, decoder["num_key_value_heads"], CONTEXT, decoder["head_size"]]
    assert config["model"]["context_length"] == config["search"]["max_length"] == CONTEXT
    assert config["model"]["vocab_size"] == VOCAB and "sliding_window" not in decoder
    assert config["search"]["past_present_share_buffer"] is True and config["search"]["num_beams"] == 1
    # the tokenizer folder: its files beside the model, its end-of-text id in the config
    assert (bundles["exact"] / "tokenizer.json").is_file() and (bundles["exact"] / "tokenizer_config.json").is_file()
    assert config["model"]["eos_token_id"] == config["model"]["pad_token_id"] == 255
    listed = (bundles["exact"] / ".lmc-bundle").read_text().split()
    assert {"genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(listed)
    assert "genai_config.json: onnxruntime-genai drives the bundle" in (bundles["exact"] / "report.md").read_text()


@needs_genai
@pytest.mark.parametrize("kind", ["exact", "int4"])
def test_genai_greedy_equals_lmc_generate_and_the_original_loop(bundles, kind):
    prompt = [int(t) for t in np.random.default_rng(3).integers(1, VOCAB, 9)]
    new = CONTEXT - len(prompt)
    ours = generate(bundles[kind], prompt, new).tokens
    original = greedy(PastDecoder(LLAMA), prompt, new)
    (tokens,), logits = _genai(bundles[kind], [prompt], new, eos=_unused(ours, original))
    assert tokens == ours == original
    decoder = StateDecoder(bundles[kind] / "model.onnx")
    lmc_logits = [decoder.forward(np.array([prompt]))[0, -1]] + \
        [decoder.forward(np.array([[t]]))[0, -1] for t in tokens[:-1]]
    assert max(float(np.abs(a[0] - b).max()) for a, b in zip(logits, lmc_logits)) < 1e-4
    if kind == "exact":
        reference = _reference(LLAMA, prompt, tokens)
        assert max(float(np.abs(a[0] - b).max()) for a, b in zip(logits, reference)) < 1e-4


@needs_genai
def test_genai_tokenizer_reads_the_copied_files(bundles):
    from tokenizers import Tokenizer

    tokenizer = og.Tokenizer(og.Model(str(bundles["exact"])))
    text = "def f(x):\n    return x"
    ids = [int(t) for t in tokenizer.encode(text)]
    assert ids == Tokenizer.from_file(str(bundles["exact"] / "tokenizer.json")).encode(text).ids
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == text


@needs_genai
def test_genai_batch_of_two_right_padded_prompts_equals_each_prompt_alone(bundles):
    """genai right-pads the shorter prompt (mask 0 on its pads); each row generates what it would alone."""
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(1, VOCAB, 9)], [int(t) for t in rng.integers(1, VOCAB, 4)]]
    new = 14
    originals = [greedy(PastDecoder(LLAMA), p, new) for p in prompts]
    rows, logits = _genai(bundles["batch2"], prompts, new, eos=_unused(*originals), pad=0)
    assert rows == originals
    for b, (prompt, row) in enumerate(zip(prompts, rows)):
        reference = _reference(LLAMA, prompt, row)
        assert max(float(np.abs(step[b] - r).max()) for step, r in zip(logits, reference)) < 1e-4
    # prompts of one length: genai and lmc's own driver agree row by row on the same bundle
    same = [prompts[0], prompts[0][::-1]]
    ours = StateDecoder(bundles["batch2"] / "model.onnx")
    logit = ours.forward(np.array(same))
    lmc_rows = [[], []]
    for _ in range(new):
        step = np.argmax(logit[:, -1], axis=-1)
        for b in range(2):
            lmc_rows[b].append(int(step[b]))
        logit = ours.forward(step[:, None])
    rows, _ = _genai(bundles["batch2"], same, new, eos=_unused(*lmc_rows))
    assert rows == lmc_rows


@needs_genai
def test_genai_drives_a_sliding_window_ring(bundles):
    """Every layer a window of 8, prefill chunk 4: rings of 11 slots, which genai allocates as its windowed
    cache (sliding_window: window_size + cache_slack) and fills in chunks of 4 (search.chunk_size); a
    13-token prompt and 18 new tokens wrap the ring."""
    config = json.loads((bundles["ring"] / "genai_config.json").read_text())
    window = config["model"]["decoder"]["sliding_window"]
    model = onnx.load(str(bundles["ring"] / "model.onnx"), load_external_data=False)
    slots = {i.name: i.type.tensor_type.shape.dim[2].dim_value for i in model.graph.input if i.name.startswith("past")}
    assert set(slots.values()) == {8 + 4 - 1} == {window["window_size"] + window["cache_slack"]}
    assert window["layers"] == [0, 1] and not window["slide_key_value_cache"] and not window["slide_inputs"]
    assert config["search"]["chunk_size"] == 4
    prompt = [int(t) for t in np.random.default_rng(7).integers(1, VOCAB, 13)]
    new = CONTEXT - len(prompt)
    ours = generate(bundles["ring"], prompt, new).tokens
    original = greedy(PastDecoder(MISTRAL_SW), prompt, new)
    (tokens,), logits = _genai(bundles["ring"], [prompt], new, eos=_unused(ours, original))
    assert tokens == ours == original
    reference = _reference(MISTRAL_SW, prompt, tokens)
    assert max(float(np.abs(a[0] - b).max()) for a, b in zip(logits, reference)) < 1e-4


@pytest.mark.parametrize("model, flags, why", [
    # a batch of two over rings: genai would run the batch's prompts in one step (it chunks only batch 1)
    (MISTRAL_SW, ["--batch", "2", "--prefill-chunk", "4"], "chunk"),
    (LLAMA, ["--kv-cache", "int8"], "int8"),               # int8 rows with scales: not genai's cache
])
def test_what_genai_cannot_drive_is_said_and_no_config_is_written(tmp_path, capsys, model, flags, why):
    out = tmp_path / "bundle"
    with pytest.raises(SystemExit) as exc:
        main(["build", str(model), "--context", str(CONTEXT), *flags, "--no-verify", "-o", str(out)])
    assert exc.value.code == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  genai ")]
    assert len(said) == 1 and "genai_config.json not written" in said[0] and why in said[0]
    assert not (out / "genai_config.json").exists()
    assert "genai_config.json not written" in (out / "report.md").read_text()
    # lmc's own driver still runs the bundle (its attention_mask fed as ones)
    batch = generation_info(out / "model.onnx").batch
    assert StateDecoder(out / "model.onnx").forward(np.arange(1, 1 + 3 * batch).reshape(batch, 3)).shape == \
        (batch, 3, VOCAB)


def test_tokenizer_refusals_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["build", str(LLAMA), "--tokenizer", str(tmp_path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "--context" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(LmcError, match="--tokenizer applies only to a generation bundle"):
        BuildOptions(tokenizer=str(tmp_path))
    with pytest.raises(LmcError, match="no such file or folder"):
        BuildOptions(context=CONTEXT, tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(LmcError, match="has no tokenizer.json"):
        BuildOptions(context=CONTEXT, tokenizer=str(tmp_path))
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(LmcError, match="not a tokenizer.json"):
        BuildOptions(context=CONTEXT, tokenizer=str(tmp_path / "bad.json"))
