"""Fuzz ``lmc build`` with broken models: every input must end in a bundle that verifies or a clean user error.

    python bench/fuzz.py --cases 3000 --seed 0 [--jobs 2] [--show 20]

Cases are made from small models of ``lmc.models`` (tiny Llama, tiny GPT-2, small CNN) by
- mutating their protobuf bytes (flipped/inserted/deleted bytes, truncation, zeroed runs, spliced models);
- mutating their graphs (inputs dropped, renamed or duplicated, wrong input dtypes and shapes, bad or missing
  attributes, initializers with a wrong shape, dangling edges, duplicated node outputs and initializers,
  changed op types, wrong opsets, dropped nodes and outputs);
- wrong command lines (input shapes of another rank or size, zero dims, options such as --quantize int8 or
  --attention chunked on a broken model).
Each case runs ``lmc build`` in-process through ``lmc.compiler.cli.main`` (catching ``SystemExit``) with
``--no-verify``; every build that succeeds is then verified against its original with the build's own check
(``compare_models`` with the bundle treated as lmc's, so a bundle onnxruntime rejects is lmc's bug).

Outcomes: ``ok`` (built and verified), ``user-error`` (exit 2, one ``lmc:`` line on stderr, no traceback),
``unverifiable`` (built, but the original itself cannot run on random inputs: a user error in a verified
build), ``crash`` (exit 1, a traceback, more than one line, any other exception or exit code),
``wrong`` (built, but the bundle's outputs differ from the original's) and ``hang`` (over --timeout).
Case i depends only on (--seed, i): ``--case I`` reruns one case and prints its stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

OUTCOMES = ("ok", "user-error", "unverifiable", "crash", "wrong", "hang")
BAD = {"crash", "wrong", "hang"}


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs too long (a BaseException: lmc's handlers let it through)."""


@dataclass
class Result:
    index: int
    family: str
    mutation: str
    outcome: str
    code: int | None
    detail: str
    seconds: float


# --- base models ---------------------------------------------------------------------------------------

def base_models() -> dict[str, tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]]:
    from lmc.models import Gpt2Config, LlamaConfig, build_cnn, build_gpt2, build_llama

    return {
        "llama": (build_llama(LlamaConfig(vocab=64, d_model=16, heads=2, kv_heads=1, layers=1, mlp=32,
                                          max_positions=16)), {"input_ids": (1, 8)}),
        "gpt2": (build_gpt2(Gpt2Config(vocab=64, d_model=16, heads=2, layers=1, max_positions=16)),
                 {"input_ids": (1, 8)}),
        "cnn": (build_cnn(channels=4, classes=4), {"image": (1, 3, 32, 32)}),
    }


# --- mutations -----------------------------------------------------------------------------------------

DTYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.INT32,
          TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16,
          TensorProto.COMPLEX64, 0, 99]
OPS = ["Add", "Mul", "MatMul", "Relu", "Softmax", "Reshape", "Transpose", "Gather", "Concat", "Identity",
       "Conv", "Cast", "NotAnOp", "LayerNormalization", "Where"]


def mutate_bytes(data: bytes, rng: random.Random, others: list[bytes]) -> tuple[bytes, str]:
    buf = bytearray(data)
    kind = rng.choice(["flip", "flip-many", "insert", "delete", "truncate", "zero-run", "splice", "dup-chunk"])
    if kind == "flip":
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    elif kind == "flip-many":
        for _ in range(rng.randint(2, 40)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == "insert":
        i = rng.randrange(len(buf))
        buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "delete":
        i = rng.randrange(len(buf))
        del buf[i:i + rng.randint(1, 64)]
    elif kind == "truncate":
        del buf[rng.randrange(len(buf)):]
    elif kind == "zero-run":
        i = rng.randrange(len(buf))
        buf[i:i + rng.randint(1, 256)] = bytes(min(len(buf) - i, 256))[: len(buf[i:i + 256])]
    elif kind == "splice":
        other = rng.choice(others)
        i, j = rng.randrange(len(buf)), rng.randrange(len(other))
        buf = buf[:i] + bytearray(other[j:])
    else:
        i = rng.randrange(len(buf))
        n = rng.randint(1, 128)
        buf[i:i] = buf[i:i + n]
    return bytes(buf), f"bytes/{kind}"


def _names(graph: onnx.GraphProto) -> list[str]:
    seen = [i.name for i in graph.input] + [t.name for t in graph.initializer]
    for node in graph.node:
        seen += [o for o in node.output if o]
    return seen


def mutate_graph(model: onnx.ModelProto, rng: random.Random) -> tuple[onnx.ModelProto, str]:
    m = copy.deepcopy(model)
    g = m.graph
    kinds = ["drop-input", "rename-input", "input-dtype", "input-shape", "input-rank", "dup-input",
             "bad-attribute", "drop-attribute", "extra-attribute", "attribute-type", "init-shape", "init-dtype",
             "init-data", "dangling-edge", "dup-output", "dup-initializer", "op-type", "drop-node", "drop-output",
             "output-rename", "opset", "domain", "swap-inputs", "extra-input-edge", "empty-graph", "ir-version",
             "cycle", "dup-node-name"]
    kind = rng.choice(kinds)
    nodes = list(g.node)
    node = rng.choice(nodes) if nodes else None
    if kind == "drop-input" and g.input:
        del g.input[rng.randrange(len(g.input))]
    elif kind == "rename-input" and g.input:
        g.input[rng.randrange(len(g.input))].name += "_renamed"
    elif kind == "input-dtype" and g.input:
        g.input[rng.randrange(len(g.input))].type.tensor_type.elem_type = rng.choice(DTYPES)
    elif kind == "input-shape" and g.input:
        dims = g.input[rng.randrange(len(g.input))].type.tensor_type.shape.dim
        if dims:
            d = dims[rng.randrange(len(dims))]
            d.dim_value = rng.choice([0, 1, 2, 5, 7, 1000])
    elif kind == "input-rank" and g.input:
        shape = g.input[rng.randrange(len(g.input))].type.tensor_type.shape
        if rng.random() < 0.5 and shape.dim:
            del shape.dim[rng.randrange(len(shape.dim))]
        else:
            shape.dim.add().dim_value = rng.choice([1, 2, 3])
    elif kind == "dup-input" and g.input:
        g.input.append(copy.deepcopy(g.input[0]))
    elif kind == "bad-attribute" and node is not None:
        with_attrs = [n for n in nodes if n.attribute]
        if with_attrs:
            a = rng.choice(rng.choice(with_attrs).attribute)
            if a.type == onnx.AttributeProto.INT:
                a.i = rng.choice([-5, -1, 0, 2, 3, 7, 1 << 40])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e30])
            elif a.type == onnx.AttributeProto.INTS:
                a.ints[:] = [rng.choice([-3, -1, 0, 1, 2, 5, 9]) for _ in range(rng.randint(0, 5))]
            elif a.type == onnx.AttributeProto.STRING:
                a.s = rng.choice([b"", b"bogus", b"NOTSET", b"\xff"])
            elif a.type == onnx.AttributeProto.TENSOR:
                a.t.dims[:] = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
    elif kind == "drop-attribute":
        with_attrs = [n for n in nodes if n.attribute]
        if with_attrs:
            n = rng.choice(with_attrs)
            del n.attribute[rng.randrange(len(n.attribute))]
    elif kind == "extra-attribute" and node is not None:
        node.attribute.append(helper.make_attribute(rng.choice(["axis", "perm", "bogus", "to", "alpha"]),
                                                    rng.choice([1, -1, [0, 1], 0.5, "x"])))
    elif kind == "attribute-type":
        with_attrs = [n for n in nodes if n.attribute]
        if with_attrs:
            n = rng.choice(with_attrs)
            i = rng.randrange(len(n.attribute))
            name = n.attribute[i].name
            del n.attribute[i]
            n.attribute.append(helper.make_attribute(name, rng.choice(["str", 2.5, [1.0, 2.0], [3, 4]])))
    elif kind == "init-shape" and g.initializer:
        t = g.initializer[rng.randrange(len(g.initializer))]
        if t.dims and rng.random() < 0.5:
            t.dims[rng.randrange(len(t.dims))] += rng.choice([-1, 1, 3])
        else:
            t.dims[:] = list(reversed(t.dims)) if len(t.dims) > 1 else [rng.randint(0, 4)]
    elif kind == "init-dtype" and g.initializer:
        g.initializer[rng.randrange(len(g.initializer))].data_type = rng.choice(DTYPES)
    elif kind == "init-data" and g.initializer:
        t = g.initializer[rng.randrange(len(g.initializer))]
        if t.raw_data:
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data))]
        else:
            t.raw_data = b"\x00" * rng.randint(0, 9)
    elif kind == "dangling-edge" and node is not None and node.input:
        node.input[rng.randrange(len(node.input))] = "dangling_" + str(rng.randrange(100))
    elif kind == "dup-output" and len(nodes) > 1:
        a, b = rng.sample(nodes, 2)
        if a.output and b.output:
            b.output[0] = a.output[0]
    elif kind == "dup-initializer" and g.initializer:
        t = copy.deepcopy(g.initializer[rng.randrange(len(g.initializer))])
        if rng.random() < 0.5 and t.dims:
            t.dims[0] += 1
        g.initializer.append(t)
    elif kind == "op-type" and node is not None:
        node.op_type = rng.choice(OPS)
    elif kind == "drop-node" and nodes:
        del g.node[rng.randrange(len(nodes))]
    elif kind == "drop-output" and g.output:
        del g.output[rng.randrange(len(g.output))]
    elif kind == "output-rename" and g.output:
        g.output[rng.randrange(len(g.output))].name = rng.choice(_names(g) + ["nowhere"])
    elif kind == "opset":
        for o in m.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = rng.choice([1, 6, 9, 11, 13, 17, 23, 25, 99])
    elif kind == "domain" and node is not None:
        node.domain = rng.choice(["com.microsoft", "bogus.domain", "ai.onnx.ml"])
    elif kind == "swap-inputs" and node is not None and len(node.input) > 1:
        inputs = list(node.input)
        rng.shuffle(inputs)
        node.input[:] = inputs
    elif kind == "extra-input-edge" and node is not None:
        node.input.append(rng.choice(_names(g)))
    elif kind == "empty-graph":
        del g.node[:]
    elif kind == "ir-version":
        m.ir_version = rng.choice([0, 1, 3, 4, 7, 11, 99])
    elif kind == "cycle" and len(nodes) > 2:
        first, last = nodes[0], nodes[-1]
        if first.input and last.output:
            first.input[0] = last.output[0]
    elif kind == "dup-node-name" and len(nodes) > 1:
        a, b = rng.sample(nodes, 2)
        b.name = a.name
    return m, f"graph/{kind}"


def mutate_args(shapes: dict[str, tuple[int, ...]], rng: random.Random) -> tuple[list[str], str]:
    name, dims = next(iter(shapes.items()))
    kind = rng.choice(["rank", "zero", "size", "unknown-name", "quantize", "attention", "inplace", "options"])
    if kind == "rank":
        dims = dims + (1,) if rng.random() < 0.5 else dims[1:]
    elif kind == "zero":
        dims = tuple(0 if i == rng.randrange(len(dims)) else d for i, d in enumerate(dims))
    elif kind == "size":
        dims = tuple(rng.choice([1, 2, 3, 17, 65]) for _ in dims)
    args = ["--input-shape", f"{name}={'x'.join(map(str, dims))}"]
    if kind == "unknown-name":
        args += ["--input-shape", "nope=1x2"]
    elif kind == "quantize":
        args += ["--quantize", rng.choice(["int8", "int4"])]
    elif kind == "attention":
        args += ["--attention", rng.choice(["chunked:2", "chunked:3", "sliding:2", "chunked:0", "sliding:x"])]
    elif kind == "inplace":
        args += ["--in-place"]
    elif kind == "options":
        args += rng.choice([["--max-ram", "1KiB"], ["--block-size", "17"], ["--disable-pass", "nope"],
                            ["--target", "x86-64"], ["--target", "nowhere"], ["--disable-pass", "cse"]])
    return args, f"args/{kind}"


def make_case(index: int, seed: int, bases, raw: dict[str, bytes]):
    """(family, mutation, model bytes, extra args) of case ``index``."""
    rng = random.Random(f"{seed}:{index}")
    family = rng.choice(sorted(bases))
    model, shapes = bases[family]
    args = []
    for name, dims in shapes.items():
        args += ["--input-shape", f"{name}={'x'.join(map(str, dims))}"]
    roll = rng.random()
    if roll < 0.35:
        data, mutation = mutate_bytes(raw[family], rng, list(raw.values()))
    elif roll < 0.9:
        mutated, mutation = mutate_graph(model, rng)
        if rng.random() < 0.2:           # two mutations at once
            mutated, second = mutate_graph(mutated, rng)
            mutation += "+" + second.split("/")[1]
        data = mutated.SerializeToString()
    else:
        args, mutation = mutate_args(shapes, rng)
        data = raw[family]
    return family, mutation, data, args


# --- running -------------------------------------------------------------------------------------------

class _StderrProxy(io.TextIOBase):
    """A stream that writes wherever sys.stderr points now (so redirected cases capture log lines too)."""

    def write(self, s):
        return sys.stderr.write(s)


def _init_worker():
    try:                       # a runaway allocation fails (MemoryError: a crash) instead of swapping for minutes
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    except (ImportError, ValueError, OSError):
        pass
    logging.basicConfig(level=logging.WARNING, stream=_StderrProxy(), format="%(levelname)s %(name)s: %(message)s")


def _alarm(signum, frame):
    raise CaseTimeout()


def _cli(args: list[str]) -> tuple[int | None, str, str, str | None]:
    """(exit code, stdout, stderr, traceback of an exception that escaped main) of ``lmc ARGS``."""
    from lmc.compiler.cli import main

    out, err = io.StringIO(), io.StringIO()
    code, escaped = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except CaseTimeout:
            raise
        except BaseException:   # noqa: BLE001 — anything escaping main is a crash
            escaped = traceback.format_exc()
    return code, out.getvalue(), err.getvalue(), escaped


def _verify_built(model_path: Path, bundle: Path) -> tuple[str, str]:
    """The build's own check on a bundle built with --no-verify: (outcome, detail)."""
    from lmc.core.errors import LmcError
    from lmc.compiler.verify import compare_models, random_inputs

    bundle_model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in bundle_model.graph.input}
    approximate = any(p.key == "lmc.quantize" and p.value != "none" for p in bundle_model.metadata_props) or any(
        p.key == "lmc.attention" and p.value.startswith("sliding") for p in bundle_model.metadata_props)
    try:
        feeds = random_inputs(bundle / "model.onnx", shapes, samples=1, seed=0)
        report = compare_models(model_path, bundle / "model.onnx", feeds, candidate_is_ours=True)
    except LmcError as exc:
        return "unverifiable", str(exc).splitlines()[0][:200]
    except CaseTimeout:
        raise
    except Exception as exc:  # noqa: BLE001
        return "crash", f"verification: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    if approximate or report.passed:
        return "ok", ""
    return "wrong", report.explain()[:300]


def run_case(job: tuple[int, int, float, str]) -> Result:
    index, seed, timeout, workdir = job
    family, mutation, data, args = make_case(index, seed, _BASES, _RAW)
    case_dir = Path(tempfile.mkdtemp(prefix=f"case{index}-", dir=workdir))
    model_path, out = case_dir / "model.onnx", case_dir / "out"
    model_path.write_bytes(data)
    start = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        code, _, err, escaped = _cli(["build", str(model_path), "-o", str(out), "--no-verify", *args])
        if escaped:
            outcome, detail = "crash", escaped.strip().splitlines()[-1]
        elif code == 0:
            outcome, detail = _verify_built(model_path, out)
        elif code == 2:
            lines = [ln for ln in err.strip().splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("lmc: ")]
            if "Traceback" in err or len(errors) != 1:
                outcome, detail = "crash", " | ".join(lines)[:300]
            else:
                outcome, detail = "user-error", errors[0][:300]
        else:
            outcome, detail = "crash", (err.strip().splitlines() or [f"exit {code}"])[-1][:300]
    except CaseTimeout:
        code, outcome, detail = None, "hang", f"over {timeout:g}s"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(case_dir, ignore_errors=True)
    return Result(index, family, mutation, outcome, code, detail, time.perf_counter() - start)


_BASES: dict = {}
_RAW: dict = {}


def _setup():
    global _BASES, _RAW
    if not _BASES:
        _BASES = base_models()
        _RAW = {k: m.SerializeToString() for k, (m, _) in _BASES.items()}


def run(cases: int, seed: int = 0, jobs: int = 1, timeout: float = 60.0, start: int = 0,
        progress: bool = False) -> list[Result]:
    """Run cases start … start+cases−1 (``jobs`` worker processes)."""
    _setup()
    results = []
    with tempfile.TemporaryDirectory(prefix="lmc-fuzz-") as workdir:
        work = [(i, seed, timeout, workdir) for i in range(start, start + cases)]
        if jobs <= 1:
            _init_worker()
            stream = map(run_case, work)
        else:
            ctx = multiprocessing.get_context("fork")
            pool = ctx.Pool(jobs, initializer=_init_worker)
            stream = pool.imap(run_case, work, chunksize=4)
        for r in stream:
            results.append(r)
            if progress:
                print(f"{r.index:5d} {r.outcome:<12} {r.seconds:6.2f}s {r.family:<6} {r.mutation:<28} {r.detail[:100]}",
                      file=sys.__stderr__, flush=True)
        if jobs > 1:
            pool.close()
            pool.join()
    return results


def summary_table(results: list[Result]) -> str:
    by_family: dict[str, Counter] = {}
    for r in results:
        by_family.setdefault(r.mutation.split("/")[0], Counter())[r.outcome] += 1
        by_family.setdefault("all", Counter())[r.outcome] += 1
    rows = [("cases", *OUTCOMES, "total")]
    for fam in sorted(k for k in by_family if k != "all") + ["all"]:
        c = by_family[fam]
        rows.append((fam, *(str(c[o]) for o in OUTCOMES), str(sum(c.values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=60.0, help="Seconds per case before it counts as a hang.")
    parser.add_argument("--case", type=int, help="Run only this case and print its outcome and stderr.")
    parser.add_argument("--show", type=int, default=20, help="Bad cases listed after the table.")
    parser.add_argument("--progress", action="store_true", help="One line per case on stderr as it finishes.")
    args = parser.parse_args(argv)
    if args.case is not None:
        _setup()
        _init_worker()
        family, mutation, data, extra = make_case(args.case, args.seed, _BASES, _RAW)
        print(f"case {args.case}: {family} {mutation} {' '.join(extra)}")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "model.onnx").write_bytes(data)
            print(f"model written to {d}/model.onnx for `lmc build {d}/model.onnx --debug {' '.join(extra)}`")
            print(run_case((args.case, args.seed, args.timeout, d)))
        return 0
    start = time.perf_counter()
    results = run(args.cases, args.seed, args.jobs, args.timeout, progress=args.progress)
    seconds = time.perf_counter() - start
    print(f"lmc build fuzz: {len(results)} cases, seed {args.seed}, {seconds:.0f}s ({args.jobs} jobs)\n")
    print(summary_table(results))
    bad = [r for r in results if r.outcome in BAD]
    if bad:
        print(f"\n{len(bad)} bad case(s) (rerun one with --case I --seed {args.seed}):")
        for r in bad[: args.show]:
            print(f"  {r.index:5d} {r.outcome:<6} {r.family:<6} {r.mutation:<28} {r.detail}")
    mutations = Counter((r.mutation, r.outcome) for r in bad)
    if mutations:
        print("\nbad cases by mutation: " + ", ".join(f"{m} {o} ×{n}" for (m, o), n in mutations.most_common()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
