"""``report.md`` of a bundle: the per-pass table, then the memory plan summary and the verification."""

from __future__ import annotations

from lmc.core.units import mib
from lmc.targets.cbundle.board import board_targets
from lmc.targets.liveness import peak_live


def peak_live_set(plan) -> tuple[int, list]:
    """(step with the largest live set, the planned tensors live there, largest first)."""
    if not plan.tensors:
        return 0, []
    everything = plan.tensors + plan.scratch
    _, best_step = peak_live((t.size, t.first, t.last) for t in everything)
    live = sorted((t for t in everything if t.first <= best_step <= t.last), key=lambda t: -t.size)
    return best_step, live


def verdict(result) -> tuple[str, str]:
    """(kind, text) of a build's verification: ``pass``/``fail`` against the exact tolerance, or
    ``approx`` for an approximate build — what was measured (its worst output) against what budget."""
    v = result.verification
    approx = tuple(result.approximations)
    if not approx:
        return ("pass", "PASS") if v.passed else ("fail", "FAIL")
    worst = max(v.outputs, key=lambda o: o.max_rel)
    held = "within the exact tolerance" if v.passed else "not held to the exact tolerance"
    return "approx", (f"approximate ({', '.join(approx)}): {worst.name} max rel err {worst.max_rel:.2g}, "
                      f"cosine {worst.cosine:.4f} — {held} {v.tolerance:g}")


def render_report(result, model_name: str) -> str:
    plan = result.plan
    lines = [
        f"# lmc build report: {model_name} → {result.target.name}",
        "",
        f"Nodes {result.nodes_before} → {result.nodes_after}; weights {mib(result.weight_bytes_before)} → "
        f"{mib(result.weight_bytes_after)}; build {result.seconds:.2f} s.",
        "",
        "Weights by dtype: " + ", ".join(f"{k} {v} bytes" for k, v in result.weights_by_dtype.items()) + ".",
        "",
        "## Passes",
        "",
        "| pass | time (s) | nodes | weight bytes | est. peak | changes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in result.records:
        changes = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v) or "—"
        lines.append(f"| {r.name} | {r.seconds:.3f} | {r.nodes} | {r.weight_bytes} | "
                     f"{mib(r.peak_estimate_bytes)} | {changes} |")
    notes = [(r.name, n) for r in result.records for n in r.notes]
    if notes:
        lines += ["", "### Pass notes", ""] + [f"- {name}: {note}" for name, note in notes]
    ratio = plan.arena_bytes / plan.lower_bound_bytes if plan.lower_bound_bytes else 1.0
    lines += [
        "",
        "## Memory plan",
        "",
        "\"est. peak\" above is the largest live set of intermediates in graph order; the plan below is exact.",
        "",
        f"- schedule: {len(plan.schedule)} steps ({plan.scheduler})",
        f"- arena: {plan.arena_bytes} bytes ({mib(plan.arena_bytes)}), lower bound {plan.lower_bound_bytes} "
        f"({ratio:.4f}×), alignment {plan.alignment}, placement {plan.placement_strategy}",
        f"- tensors in arena: {len(plan.tensors)}, kernel scratch buffers: {len(plan.scratch)}",
        f"- inputs + outputs: {plan.io_bytes} bytes",
        "- weights: " + ", ".join(f"{k} {v} bytes" for k, v in sorted(plan.weights_bytes.items()) if v),
        f"- peak RAM (arena + io + RAM-resident weights{' + state' if plan.state else ''}): {plan.peak_ram_bytes} "
        f"bytes ({mib(plan.peak_ram_bytes)})",
    ]
    if plan.state:
        lines += [f"- state (KV cache, updated in place): {plan.state_bytes} bytes ({mib(plan.state_bytes)}) in "
                  f"{len(plan.state)} buffers", "", "| profile | tokens per step | arena | io | peak RAM | predicted "
                  "resident peak |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p.name} | {p.sequence} | {mib(p.arena_bytes)} | {mib(p.io_bytes)} | {mib(p.peak_ram_bytes)} | "
                  f"{mib(p.predicted_peak_bytes)} |" for p in plan.profiles]
        lines.append("")
    if plan.runtime:
        items = ", ".join(f"{k} {mib(v)}" for k, v in plan.runtime["items"].items() if v)
        lines.append(f"- runtime ({plan.runtime['session_options']}): predicted resident peak "
                     f"{mib(plan.runtime['predicted_peak_bytes'])} = {items}")
    peak_step, live = peak_live_set(plan)
    if live:
        lines += ["", f"At the busiest step ({peak_step}: `{plan.schedule[peak_step]}`) these tensors are live "
                      "(largest first):", "", "| tensor | bytes | live steps |", "|---|---:|---|"]
        for t in live[:8]:
            lines.append(f"| `{t.name}` | {t.size} | {t.first}–{t.last} |")
    if result.cbundle is not None:
        c = result.cbundle
        board = f" or `--on {result.target.name}` (its emulated board)" if result.target.name in board_targets() else ""
        lines += ["", "## C bundle", "",
                  f"model.h / model.c / weights.c / runner.c / CMakeLists.txt beside model.onnx: one kernel call per "
                  f"step of the schedule, every intermediate at `lmc_arena + offset` (LMC_ARENA_BYTES = "
                  f"{c.arena_bytes}); kernel families {', '.join(c.families)}; {c.macs:,} multiply-accumulates per "
                  f"inference; weight arrays {c.weight_bytes:,} bytes (const: flash). Check it with "
                  f"`lmc verify <bundle> --against <model>` (the host's cc){board}."]
    if result.cbundle_skipped:
        lines += ["", "## C bundle", "", f"Not written: {result.cbundle_skipped}."]
    linker, linker_skipped = result.linker, result.linker_skipped
    if linker is not None:
        lines += ["", "## Plan vs linker", ""] + linker.report_lines()
    elif linker_skipped:
        lines += ["", "## Plan vs linker", "", f"Not linked (plan.json `\"linker\": null`): {linker_skipped}."]
    if result.verification is not None:
        v = result.verification
        kind, text = verdict(result)
        lines += ["", "## Verification (onnxruntime, bundle vs original)", "",
                  f"{v.samples} random sample(s): {text}" if kind == "approx" else
                  f"{v.samples} random sample(s), tolerance {v.tolerance:g} (max relative error): {text}", "",
                  "| output | max abs | max rel | cosine |", "|---|---:|---:|---:|"]
        for o in v.outputs:
            lines.append(f"| {o.name} | {o.max_abs:.3g} | {o.max_rel:.3g} | {o.cosine:.8f} |")
    return "\n".join(lines) + "\n"
