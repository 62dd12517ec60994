"""``report.html`` of a bundle: what a user looks at. One self-contained file — inline CSS and SVG, no
script, no network — rendered from the same ``BuildResult`` as ``report.md``:

- the memory at a glance: stacked bars of the planned peak RAM (arena, io, RAM-resident weights, state)
  and of the runtime's predicted resident peak (``plan.runtime.items``: session, weights, prepacked
  copies, arena, io, state, scratch) on one scale, and the weights by placement;
- generation bundles: each profile (decode, prefill) and the state buffers;
- the memory timeline: x = schedule step, y = arena offset; every planned tensor is a rectangle from its
  first to its last step at its offset with its size, kernel scratch hatched; the peak step is marked and
  the tensors live there are listed. Large graphs stay readable: tensors smaller than ``SMALL_FRACTION``
  of the arena (and any beyond ``MAX_RECTS``, the largest being drawn) are summed per step into one band
  under the timeline, and the x axis is scaled to the plot width;
- the per-pass table (nodes, weight bytes, estimated peak, what changed, notes) and the verification.

Tooltips are SVG ``<title>`` elements (the browser's own). The output is deterministic: the same build
gives the same bytes — which is why wall-clock times (per pass and of the build, different on every run)
are left to ``report.md``.
"""

from __future__ import annotations

import zlib
from html import escape

from lmc.compiler.report import peak_live_set, verdict

HTML_FILE = "report.html"
MAX_RECTS = 3000            # rectangles drawn in the timeline at most (largest tensors first)
SMALL_FRACTION = 1 / 1000   # tensors below this share of the arena go into the per-step "small" band
PLOT_W, PLOT_H, BAND_H = 1180, 440, 70
MARGIN_L, MARGIN_T = 76, 34

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:24px 32px;
background:#fafbfc;max-width:1360px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;
padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
.sub{color:#5b6577;margin:0 0 14px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:8px 12px;min-width:140px}
.card b{display:block;font-size:18px}.card span{color:#5b6577;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0 10px}
th,td{border:1px solid #dde2ea;padding:3px 8px;vertical-align:top;text-align:left}
th{background:#eef1f6;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.same td{color:#8a93a3}
.bar{display:inline-block;height:8px;background:#7c9cd6;vertical-align:middle;margin-right:6px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
.notes{font-size:12px;color:#3d4657;margin:0;padding-left:16px}
.pass{color:#1d7a3a;font-weight:600}.fail{color:#b3261e;font-weight:600}.approx{color:#3d4657;font-weight:600}
.legend{font-size:12px;color:#3d4657}.sw{display:inline-block;width:11px;height:11px;margin:0 4px -1px 10px;
border:1px solid #0003}
svg{background:#fff;border:1px solid #dde2ea;border-radius:6px}
svg text{font:11px system-ui,sans-serif;fill:#3d4657}
"""

# one colour per kind of memory, shared by the bars and the legends
KIND_COLORS = {
    "arena": "#5b8def", "io": "#9b7be0", "ram weights": "#e0a23b", "state": "#2fa37a",
    "session": "#8a93a3", "weights": "#e0c23b", "prepacked_weights": "#d9763b", "scratch": "#d9534f",
    "mmap": "#e0c23b", "flash": "#b0bccf", "ram": "#e0a23b", "inputs": "#b49be8", "outputs": "#7d5fc4",
}
KIND_LABELS = {"prepacked_weights": "prepacked weights", "weights": "weights (resident)",
               "ram weights": "weights in RAM", "mmap": "mmap", "flash": "flash", "ram": "RAM"}


def human(n: int | float | None) -> str:
    """Bytes for people: B, KiB, MiB or GiB with 3 significant digits."""
    if n is None:
        return "—"
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{int(n)} B"


def _num(x: float) -> str:
    """A coordinate with at most two decimals, no trailing zeros (stable, compact)."""
    text = f"{x:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _color(name: str) -> str:
    """A stable colour per tensor name (blues to greens, light enough for dark labels)."""
    h = zlib.crc32(name.encode("utf-8"))
    hue = 170 + h % 90          # cyan .. blue
    light = 58 + (h >> 8) % 18
    return f"hsl({hue},55%,{light}%)"


def _e(text) -> str:
    return escape(str(text), quote=True)


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>'
                                           for k, v in items) + "</div>"


def _stacked_bars(rows: list[tuple[str, list[tuple[str, int]]]]) -> str:
    """Horizontal stacked bars on one scale: rows of (label, [(kind, bytes)])."""
    top = max((sum(v for _, v in parts) for _, parts in rows), default=0) or 1
    label_w, width, row_h = 190, 980, 30
    height = len(rows) * (row_h + 16) + 30
    out = [f'<svg width="{label_w + width + 150}" height="{height}" '
           f'role="img" aria-label="memory by kind">']
    kinds: list[str] = []
    for i, (label, parts) in enumerate(rows):
        y = 12 + i * (row_h + 16)
        total = sum(v for _, v in parts)
        out.append(f'<text x="8" y="{y + row_h / 2 + 4}">{_e(label)}</text>')
        x = float(label_w)
        for kind, value in parts:
            if value <= 0:
                continue
            if kind not in kinds:
                kinds.append(kind)
            w = width * value / top
            out.append(f'<rect x="{_num(x)}" y="{y}" width="{_num(max(w, 0.5))}" height="{row_h}" '
                       f'fill="{KIND_COLORS.get(kind, "#999")}" stroke="#fff" stroke-width="0.5">'
                       f'<title>{_e(label)}: {_e(KIND_LABELS.get(kind, kind))} {_e(human(value))} '
                       f'({value} bytes, {100 * value / (total or 1):.1f}%)</title></rect>')
            text = f"{KIND_LABELS.get(kind, kind)} {human(value)}"
            if w > 6.6 * len(text) + 8:
                out.append(f'<text x="{_num(x + 4)}" y="{y + row_h / 2 + 4}" style="fill:#fff">'
                           f'{_e(text)}</text>')
            x += w
        out.append(f'<text x="{_num(x + 6)}" y="{y + row_h / 2 + 4}" style="font-weight:600">'
                   f'{_e(human(total))}</text>')
    out.append("</svg>")
    legend = "".join(f'<span class="sw" style="background:{KIND_COLORS.get(k, "#999")}"></span>'
                     f'{_e(KIND_LABELS.get(k, k))}' for k in kinds)
    return "".join(out) + f'<div class="legend">{legend}</div>'


def _memory_section(plan) -> list[str]:
    ram_w = plan.weights_bytes.get("ram", 0)
    rows = [("planned peak RAM", [("arena", plan.arena_bytes), ("io", plan.io_bytes), ("ram weights", ram_w),
                                  ("state", plan.state_bytes)])]
    if plan.runtime:
        items = plan.runtime.get("items", {})
        order = ["session", "weights", "prepacked_weights", "arena", "io", "inputs", "outputs", "state", "scratch"]
        rows.append(("runtime, predicted", [(k, int(items[k])) for k in order if k in items] +
                     [(k, int(v)) for k, v in sorted(items.items()) if k not in order]))
    rows.append(("weights by placement", [(k, int(v)) for k, v in sorted(plan.weights_bytes.items())]))
    out = ["<h2>Memory at a glance</h2>",
           '<p class="sub">The planned peak is exact (lmc places every intermediate); the runtime row is the '
           "target's runtime model: what onnxruntime keeps resident beyond the plan (session, weights and the "
           "prepacked copies it makes at load).</p>", _stacked_bars(rows)]
    if plan.runtime:
        options = plan.runtime.get("session_options", "")
        if isinstance(options, dict):
            options = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "runtime defaults"
        out.append(f'<p class="sub">runtime session options: {_e(options)}; '
                   f'predicted resident peak {_e(human(plan.runtime.get("predicted_peak_bytes")))}</p>')
    return out


def _generation_section(plan) -> list[str]:
    if not plan.state:
        return []
    shown = next((p.name for p in plan.profiles if p.peak_ram_bytes == plan.peak_ram_bytes), "")
    out = ["<h2>Generation: profiles and state</h2>",
           f'<p class="sub">One model serves both profiles; the state (KV cache, {_e(human(plan.state_bytes))} '
           f"in {len(plan.state)} buffers) is updated in place and counted in each profile's peak RAM. The "
           f"timeline below is the <b>{_e(shown)}</b> profile (the higher peak).</p>",
           "<table><tr><th>profile</th><th>tokens per step</th><th>arena</th><th>lower bound</th><th>io</th>"
           "<th>state</th><th>peak RAM</th><th>predicted resident peak</th></tr>"]
    for p in plan.profiles:
        out.append(f"<tr><td>{_e(p.name)}</td><td class=\"n\">{p.sequence}</td>" + "".join(
            f'<td class="n">{_e(human(v))}</td>' for v in (p.arena_bytes, p.lower_bound_bytes, p.io_bytes,
                                                          plan.state_bytes, p.peak_ram_bytes,
                                                          p.predicted_peak_bytes)) + "</tr>")
    out.append("</table>")
    rows = [("decode" if p.name == "decode" else p.name,
             [("arena", p.arena_bytes), ("io", p.io_bytes), ("ram weights", plan.weights_bytes.get("ram", 0)),
              ("state", plan.state_bytes)]) for p in plan.profiles]
    if rows:
        out.append(_stacked_bars([(f"{n}: planned peak RAM", parts) for n, parts in rows]))
    out.append("<h3>State buffers</h3><table><tr><th>input (past)</th><th>output (present, same buffer)</th>"
               "<th>bytes</th></tr>")
    for b in plan.state[:64]:
        out.append(f"<tr><td><code>{_e(b.input)}</code></td><td><code>{_e(b.output)}</code></td>"
                   f'<td class="n">{_e(human(b.size))}</td></tr>')
    if len(plan.state) > 64:
        out.append(f'<tr><td colspan="3">… and {len(plan.state) - 64} more buffers</td></tr>')
    out.append("</table>")
    return out


def _ticks(top: float, count: int = 6) -> list[float]:
    """Round tick values from 0 to ``top`` (about ``count`` of them)."""
    if top <= 0:
        return [0.0]
    raw = top / count
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    ticks, v = [], 0.0
    while v <= top + 1e-9:
        ticks.append(v)
        v += step
    return ticks


def _timeline(plan) -> list[str]:
    steps = len(plan.schedule)
    arena = plan.arena_bytes
    everything = list(plan.tensors) + list(plan.scratch)
    if not steps or not everything or not arena:
        return ["<h2>Memory timeline</h2>", '<p class="sub">No intermediate tensors are planned in the arena.</p>']
    scratch_names = {t.name for t in plan.scratch}
    peak_step, live = peak_live_set(plan)
    live_names = {t.name for t in live}
    threshold = arena * SMALL_FRACTION
    big = sorted((t for t in everything if t.size >= threshold), key=lambda t: (-t.size, t.name, t.first))
    drawn, small = big[:MAX_RECTS], big[MAX_RECTS:] + [t for t in everything if t.size < threshold]
    # live bytes per step: all tensors, and the ones aggregated into the band
    total_live, small_live = [0] * (steps + 1), [0] * (steps + 1)
    for t in everything:
        total_live[t.first] += t.size
        total_live[t.last + 1] -= t.size
    for t in small:
        small_live[t.first] += t.size
        small_live[t.last + 1] -= t.size
    for i in range(1, steps + 1):
        total_live[i] += total_live[i - 1]
        small_live[i] += small_live[i - 1]
    sx = PLOT_W / steps
    sy = PLOT_H / arena
    x0, y0 = MARGIN_L, MARGIN_T
    band_top = y0 + PLOT_H + 46
    band_h = BAND_H if small else 0
    height = band_top + band_h + (40 if small else 8)
    width = MARGIN_L + PLOT_W + 24
    out = [f'<svg width="{width}" height="{height}" role="img" '
           f'aria-label="arena occupancy per schedule step">',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f3c3c1"/>'
           '<line x1="0" y1="0" x2="0" y2="6" stroke="#d9534f" stroke-width="3"/></pattern></defs>',
           f'<rect x="{x0}" y="{y0}" width="{PLOT_W}" height="{PLOT_H}" fill="#f4f6fa"/>']
    # y axis: arena offset (0 at the bottom)
    top_mib = arena / 2**20
    unit, scale = ("MiB", 2**20) if top_mib >= 1 else ("KiB", 2**10)
    for v in _ticks(arena / scale):
        y = y0 + PLOT_H - v * scale * sy
        out.append(f'<line x1="{x0 - 4}" y1="{_num(y)}" x2="{x0 + PLOT_W}" y2="{_num(y)}" stroke="#dde2ea" '
                   f'stroke-width="0.6"/><text x="{x0 - 7}" y="{_num(y + 4)}" text-anchor="end">'
                   f'{_num(v)}</text>')
    out.append(f'<text x="12" y="{y0 - 12}">offset ({unit})</text>')
    # x axis: schedule step
    for v in _ticks(steps - 1, 10):
        x = x0 + (int(v) + 0.5) * sx
        out.append(f'<line x1="{_num(x)}" y1="{y0 + PLOT_H}" x2="{_num(x)}" y2="{y0 + PLOT_H + 4}" stroke="#5b6577"/>'
                   f'<text x="{_num(x)}" y="{y0 + PLOT_H + 16}" text-anchor="middle">{int(v)}</text>')
    out.append(f'<text x="{x0 + PLOT_W / 2}" y="{y0 + PLOT_H + 32}" text-anchor="middle">schedule step '
               f'({steps} steps)</text>')
    # the tensors, largest first so small ones stay visible on top
    for t in drawn:
        x, w = x0 + t.first * sx, (t.last - t.first + 1) * sx
        y, h = y0 + PLOT_H - (t.offset + t.size) * sy, t.size * sy
        is_scratch = t.name in scratch_names
        fill = "url(#hatch)" if is_scratch else _color(t.name)
        stroke = ' stroke="#b3261e" stroke-width="1.2"' if t.name in live_names else \
            ' stroke="#ffffff" stroke-width="0.4"'
        kind = "scratch of node" if is_scratch else "tensor"
        out.append(f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(max(w, 0.6))}" height="{_num(max(h, 0.6))}" '
                   f'fill="{fill}"{stroke}><title>{kind} {_e(t.name)}: {_e(human(t.size))} ({t.size} bytes) at '
                   f'offset {t.offset}, steps {t.first}–{t.last}</title></rect>')
    # total live bytes per step, as a step line over the rectangles
    points = []
    for i in range(steps):
        y = y0 + PLOT_H - total_live[i] * sy
        points.append(f"{_num(x0 + i * sx)},{_num(y)} {_num(x0 + (i + 1) * sx)},{_num(y)}")
    out.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#1d2330" stroke-width="1" '
               f'stroke-opacity="0.55"><title>live bytes per step (all planned tensors and scratch)</title>'
               f'</polyline>')
    # the peak step
    px = x0 + (peak_step + 0.5) * sx
    peak_bytes = total_live[peak_step]
    out.append(f'<line id="peak-step" x1="{_num(px)}" y1="{y0 - 6}" x2="{_num(px)}" y2="{y0 + PLOT_H}" '
               f'stroke="#b3261e" stroke-width="1.5" stroke-dasharray="5,3"/>')
    names = ", ".join(t.name for t in live[:3]) + (f" +{len(live) - 3} more" if len(live) > 3 else "")
    anchor = "end" if px > x0 + PLOT_W * 0.5 else "start"
    lx = px - 6 if anchor == "end" else px + 6
    label = f"peak at step {peak_step}: {human(peak_bytes)} live — {names}"
    room = int(((lx - 8) if anchor == "end" else (width - lx - 8)) / 6.4)     # ~6.4 px per bold character
    if len(label) > room:
        label = label[:max(room - 1, 24)] + "…"
    out.append(f'<text x="{_num(lx)}" y="{y0 - 14}" text-anchor="{anchor}" style="fill:#b3261e;font-weight:600">'
               f'{_e(label)}</text>')
    # the band of small tensors
    band_max = max(small_live[:steps]) or 1
    out.append(f'<rect x="{x0}" y="{band_top}" width="{PLOT_W}" height="{band_h}" fill="#f4f6fa"/>'
               f'<text x="12" y="{band_top - 6}">tensors under {_e(human(threshold))}'
               f'{" or beyond the " + str(MAX_RECTS) + " largest" if len(big) > MAX_RECTS else ""}: '
               + (f'{len(small)}, live bytes per step (max {_e(human(band_max))})</text>' if small else 'none</text>'))
    if small:
        pts = [f"{x0},{band_top + BAND_H}"]
        for i in range(steps):
            y = band_top + BAND_H - small_live[i] / band_max * (BAND_H - 4)
            pts.append(f"{_num(x0 + i * sx)},{_num(y)} {_num(x0 + (i + 1) * sx)},{_num(y)}")
        pts.append(f"{x0 + PLOT_W},{band_top + BAND_H}")
        out.append(f'<polygon points="{" ".join(pts)}" fill="#9fb6e0" stroke="#5b8def" stroke-width="0.6">'
                   f'<title>small tensors: live bytes per step</title></polygon>')
    if small:
        out.append(f'<line x1="{_num(px)}" y1="{band_top}" x2="{_num(px)}" y2="{band_top + BAND_H}" '
                   f'stroke="#b3261e" stroke-width="1.5" stroke-dasharray="5,3"/>')
    out.append("</svg>")
    legend = ('<div class="legend"><span class="sw" style="background:hsl(200,55%,64%)"></span>tensor (one colour '
              'per name) <span class="sw" style="background:#f3c3c1;border-color:#d9534f"></span>kernel scratch '
              '<span class="sw" style="background:#fff;border:2px solid #b3261e"></span>live at the peak step '
              '<span class="sw" style="background:#1d2330;opacity:.55;height:2px"></span>live bytes per step '
              '— hover a rectangle for its name, size, offset and lifetime</div>')
    head = ["<h2>Memory timeline</h2>",
            f'<p class="sub">Arena {_e(human(arena))} ({arena} bytes; lower bound {_e(human(plan.lower_bound_bytes))}), '
            f"{len(plan.tensors)} tensors and {len(plan.scratch)} scratch buffers over {steps} steps "
            f"({_e(plan.scheduler)} schedule, {_e(plan.placement_strategy)} placement); {len(drawn)} drawn as "
            f"rectangles.</p>"]
    table = [f'<h3 id="peak">Live at the peak step {peak_step}: <code>{_e(plan.schedule[peak_step])}</code> '
             f"({_e(human(peak_bytes))})</h3>",
             "<table><tr><th>tensor</th><th>bytes</th><th>offset</th><th>live steps</th><th>share</th></tr>"]
    for t in live[:12]:
        share = t.size / (peak_bytes or 1)
        kind = " (scratch)" if t.name in scratch_names else ""
        table.append(f"<tr><td><code>{_e(t.name)}</code>{kind}</td><td class=\"n\">{_e(human(t.size))}</td>"
                     f'<td class="n">{t.offset}</td><td class="n">{t.first}–{t.last}</td>'
                     f'<td><span class="bar" style="width:{_num(120 * share)}px"></span>{100 * share:.1f}%</td></tr>')
    if len(live) > 12:
        table.append(f'<tr><td colspan="5">… and {len(live) - 12} more</td></tr>')
    table.append("</table>")
    return head + ["".join(out), legend] + table


def _passes(result) -> list[str]:
    records = result.records
    if not records:
        return []
    top_w = max((r.weight_bytes for r in records), default=0) or 1
    top_p = max((r.peak_estimate_bytes or 0 for r in records), default=0) or 1
    out = ["<h2>Passes</h2>",
           '<p class="sub">In run order. "est. peak" is the largest live set of intermediates in graph order after '
           "the pass; the plan above is exact. Wall-clock times are in report.md (they differ between runs; this "
           "file does not).</p>",
           "<table><tr><th>#</th><th>pass</th><th>nodes</th><th>weight bytes</th><th>est. peak</th>"
           "<th>what changed</th><th>notes</th></tr>"]
    prev_nodes = result.nodes_before
    for i, r in enumerate(records):
        changes = [(k, v) for k, v in r.stats.items() if v]
        nodes_delta = r.nodes - prev_nodes
        prev_nodes = r.nodes
        delta = f' <span style="color:#5b6577">({nodes_delta:+d})</span>' if nodes_delta else ""
        notes = "".join(f"<li>{_e(n)}</li>" for n in r.notes[:8])
        if len(r.notes) > 8:
            notes += f"<li>… {len(r.notes) - 8} more (report.md)</li>"
        peak = r.peak_estimate_bytes
        cls = ' class="same"' if not changes and not r.notes and not nodes_delta else ""
        out.append(
            f"<tr{cls}><td class=\"n\">{i + 1}</td><td style=\"white-space:nowrap\">{_e(r.name)}</td><td class=\"n\">{r.nodes}{delta}</td>"
            f'<td class="n"><span class="bar" style="width:{_num(60 * r.weight_bytes / top_w)}px"></span>'
            f"{_e(human(r.weight_bytes))}</td>"
            f'<td class="n"><span class="bar" style="width:{_num(60 * (peak or 0) / top_p)}px;background:#5b8def">'
            f"</span>{_e(human(peak))}</td>"
            f"<td>{_e(', '.join(f'{k}={v}' for k, v in changes)) or '—'}</td>"
            + (f'<td><ul class="notes">{notes}</ul></td></tr>' if notes else "<td></td></tr>"))
    out.append("</table>")
    return out


def _verification(result) -> list[str]:
    v = result.verification
    if v is None:
        return ["<h2>Verification</h2>", '<p class="sub">Not verified (--no-verify).</p>']
    kind, text = verdict(result)
    judged = "" if kind == "approx" else f", tolerance {v.tolerance:g} (max relative error)"
    out = ["<h2>Verification (onnxruntime, bundle vs original)</h2>",
           f'<p>{v.samples} random sample(s){judged}: <span class="{kind}">{_e(text)}</span></p>',
           "<table><tr><th>output</th><th>max abs</th><th>max rel</th><th>cosine</th></tr>"]
    for o in v.outputs:
        out.append(f'<tr><td><code>{_e(o.name)}</code></td><td class="n">{o.max_abs:.2g}</td>'
                   f'<td class="n">{o.max_rel:.2g}</td><td class="n">{o.cosine:.6f}</td></tr>')
    out.append("</table>")
    return out


def render_report_html(result, model_name: str) -> str:
    plan = result.plan
    runtime_peak = plan.runtime.get("predicted_peak_bytes") if plan.runtime else None
    cards = [("nodes", f"{result.nodes_before} → {result.nodes_after}"),
             ("weights", f"{human(result.weight_bytes_before)} → {human(result.weight_bytes_after)}"),
             ("arena", human(plan.arena_bytes)), ("lower bound", human(plan.lower_bound_bytes)),
             ("planned peak RAM", human(plan.peak_ram_bytes))]
    if plan.state:
        cards.append(("state (KV cache)", human(plan.state_bytes)))
    if runtime_peak is not None:
        cards.append(("predicted resident peak", human(runtime_peak)))
    dtypes = ", ".join(f"{k} {human(v)}" for k, v in result.weights_by_dtype.items())
    body = [f"<h1>lmc build report: {_e(model_name)} → {_e(result.target.name)}</h1>",
            f'<p class="sub">{len(plan.schedule)} scheduled steps; weights by dtype: {_e(dtypes or "none")}.</p>',
            _cards(cards)]
    body += _memory_section(plan)
    body += _generation_section(plan)
    body += _timeline(plan)
    body += _passes(result)
    body += _verification(result)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            f"<title>lmc report: {_e(model_name)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
