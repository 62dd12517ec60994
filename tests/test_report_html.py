"""report.html: written in every bundle, self-contained (no network), parsable, an SVG timeline with the peak
step marked, and byte-identical across two builds of the same model."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import onnx
import pytest

from lmc.compiler.build import BuildOptions, build
from lmc.compiler.report import peak_live_set
from lmc.compiler.report_html import MAX_RECTS, render_report_html
from lmc.models import build_llama
from lmc.targets.plan import MemoryPlan, PlannedTensor

OPTIONS = BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 32)})


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    onnx.save(build_llama(), str(d / "tiny-llama.onnx"))
    return [(build(d / "tiny-llama.onnx", OPTIONS, d / f"out{i}"), d / f"out{i}") for i in range(2)]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.stack: list[str] = []
        self.errors: list[str] = []

    VOID = {"meta", "br", "img", "link", "input", "hr", "rect", "line", "path", "polyline", "polygon", "stop"}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href", "action") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href", "action") and v]

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_report_html_in_bundle_is_parsable_and_offline(two_builds):
    _, out = two_builds[0]
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "report.html" in (out / ".lmc-bundle").read_text()
    parser = _Collect()
    parser.feed(text)
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
    assert "svg" in parser.tags and "table" in parser.tags
    assert not parser.urls, parser.urls
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text
    ET.fromstring(text.split("\n", 1)[1])        # well-formed XML after the doctype line


def test_report_html_marks_the_peak_step(two_builds):
    result, out = two_builds[0]
    text = (out / "report.html").read_text(encoding="utf-8")
    plan = MemoryPlan.from_dict(json.loads((out / "plan.json").read_text()))
    step, live = peak_live_set(plan)
    assert 'id="peak-step"' in text
    assert f"peak at step {step}:" in text
    assert f"Live at the peak step {step}:" in text
    for t in live[:3]:
        assert t.name in text
    for r in result.records:
        assert f">{r.name}</td>" in text.replace("&#x27;", "'")


def test_report_html_is_byte_identical_across_builds(two_builds):
    (_, a), (_, b) = two_builds
    assert (a / "report.html").read_bytes() == (b / "report.html").read_bytes()


def test_report_html_large_plan_is_capped(two_builds):
    """A 2000-step plan with 6000 tensors: at most MAX_RECTS rectangles in the timeline, the small tensors
    summed into the band, and still well-formed."""
    import dataclasses

    result, _ = two_builds[0]
    steps = 2000
    tensors = tuple(PlannedTensor(f"t{i}", 64 if i % 3 else 4096 * (1 + i % 7), (i * 4096) % (1 << 22),
                                  i % steps, min(steps - 1, i % steps + 3)) for i in range(6000))
    plan = dataclasses.replace(result.plan, schedule=tuple(f"n{i}" for i in range(steps)), tensors=tensors,
                               scratch=(), arena_bytes=(1 << 22) + 32768, inplace=())
    text = render_report_html(dataclasses.replace(result, plan=plan), "big.onnx")
    timeline = text[text.index('aria-label="arena occupancy'):]
    timeline = timeline[:timeline.index("</svg>")]
    assert timeline.count("<rect ") <= MAX_RECTS + 4
    assert "tensors under" in timeline and "<polygon" in timeline
    ET.fromstring(text.split("\n", 1)[1])


def test_generation_report_html_shows_profiles_and_state(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "models" / "fixtures" / "llama-past-optimum.onnx"
    if not fixture.is_file():
        pytest.skip("generation fixture missing")
    build(fixture, BuildOptions(target="cortex-a55", context=32, prefill_chunk=8, verify=False), tmp_path / "gen")
    text = (tmp_path / "gen" / "report.html").read_text(encoding="utf-8")
    assert "Generation: profiles and state" in text
    assert "<td>decode</td>" in text and "<td>prefill</td>" in text
    assert "State buffers" in text and "present" in text
    assert "runtime, predicted" in text


def test_quantized_build_reports_what_was_measured_not_fail(model_dir, tmp_path):
    """An int8 build is approximate: its reports say what was measured against what budget, in a neutral
    colour — never the red "FAIL" of an exact build over its tolerance."""
    from lmc.compiler.build import BuildOptions, QuantizeMode, build

    out = tmp_path / "int8"
    result = build(model_dir / "tiny-gpt2.onnx", BuildOptions(target="x86-64", input_shapes={"input_ids": (1, 16)},
                                                               quantize=QuantizeMode.INT8), out)
    v = result.verification
    assert result.approximations and not v.passed      # over the exact tolerance, as int8 is
    md = (out / "report.md").read_text()
    section = md[md.index("## Verification"):]
    assert "FAIL" not in section and "PASS" not in section
    worst = max(v.outputs, key=lambda o: o.max_rel)
    assert (f"approximate ({', '.join(result.approximations)}): {worst.name} max rel err {worst.max_rel:.2g}, cosine {worst.cosine:.4f}"
            f" — not held to the exact tolerance {v.tolerance:g}") in section
    html = (out / "report.html").read_text()
    section = html[html.index("<h2>Verification"):]
    assert 'class="fail"' not in section and "FAIL" not in section
    assert 'class="approx"' in section and "not held to the exact tolerance" in section
