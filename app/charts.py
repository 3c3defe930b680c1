"""Server-rendered SVG: the plan's components stacked against the GPU's memory, and a run's loss
and measured memory per step against the plan's prediction.

Readable without colour: every family has its own fill pattern as well as its colour, the
legend repeats the pattern with the name and GiB, and a labelled line marks the usable memory.
"""

from __future__ import annotations

import itertools
import math
from html import escape
from urllib.parse import quote

from planner.plan import GIB, Plan

# family -> (colour, pattern id)
FAMILIES = {
    "weights": ("#4e79a7", "solid"),
    "gradients": ("#f28e2b", "diag"),
    "optimizer_state": ("#e15759", "cross"),
    "activations": ("#76b7b2", "dots"),
    "logits": ("#59a14f", "hlines"),
    "temporary": ("#edc948", "vlines"),
    "reference_model": ("#b07aa1", "rdiag"),
    "reward_model": ("#ff9da7", "rdiag"),
    "value_model": ("#9c755f", "diag"),
    "kv_cache": ("#bab0ac", "grid"),
    "runtime": ("#79706e", "solid"),
}
PATTERNS = """
<pattern id="p-diag" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="{c}"/><line x1="0" y1="0" x2="0" y2="6" stroke="#000" stroke-opacity=".45" stroke-width="2"/></pattern>
<pattern id="p-rdiag" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(-45)"><rect width="6" height="6" fill="{c}"/><line x1="0" y1="0" x2="0" y2="6" stroke="#000" stroke-opacity=".45" stroke-width="2"/></pattern>
<pattern id="p-cross" width="6" height="6" patternUnits="userSpaceOnUse"><rect width="6" height="6" fill="{c}"/><path d="M0 0L6 6M6 0L0 6" stroke="#000" stroke-opacity=".45"/></pattern>
<pattern id="p-dots" width="5" height="5" patternUnits="userSpaceOnUse"><rect width="5" height="5" fill="{c}"/><circle cx="2.5" cy="2.5" r="1.1" fill="#000" fill-opacity=".5"/></pattern>
<pattern id="p-hlines" width="5" height="5" patternUnits="userSpaceOnUse"><rect width="5" height="5" fill="{c}"/><line x1="0" y1="2.5" x2="5" y2="2.5" stroke="#000" stroke-opacity=".45"/></pattern>
<pattern id="p-vlines" width="5" height="5" patternUnits="userSpaceOnUse"><rect width="5" height="5" fill="{c}"/><line x1="2.5" y1="0" x2="2.5" y2="5" stroke="#000" stroke-opacity=".45"/></pattern>
<pattern id="p-grid" width="6" height="6" patternUnits="userSpaceOnUse"><rect width="6" height="6" fill="{c}"/><path d="M0 3H6M3 0V6" stroke="#000" stroke-opacity=".4"/></pattern>
"""


def family_totals(plan: Plan) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for component in plan.components:
        if component.bytes:
            totals[component.family] = totals.get(component.family, 0) + component.bytes
    return list(totals.items())


def _pattern_def(family: str, pattern_id: str) -> str:
    """The family's <pattern> under the given id ("" for a solid family)."""
    colour, pattern = FAMILIES.get(family, ("#999999", "solid"))
    if pattern == "solid":
        return ""
    body = PATTERNS.split(f'id="p-{pattern}"', 1)[1].split("</pattern>", 1)[0]
    return f'<pattern id="{pattern_id}"{body.replace("{c}", colour)}</pattern>'


def _fill(family: str, prefix: str) -> str:
    colour, pattern = FAMILIES.get(family, ("#999999", "solid"))
    return colour if pattern == "solid" else f"url(#{prefix}-{family})"


def _pct(size: float, scale_max: int) -> float:
    return size / scale_max * 100


def memory_bar_svg(plan: Plan, compact: bool = False, scale_bytes: int | None = None) -> str:
    """One horizontal bar: components by family, the GPU's usable memory as a marked line, and
    the plan's band (low to high end) as a bracket above the bar. Bars drawn side by side pass
    one `scale_bytes`, so their lengths compare.

    Positions are percentages of the SVG's width and there is no viewBox: the bar stretches to
    any width while the text stays 12 px, readable on a phone as on a desktop (a scaled viewBox
    shrank it to 5 px at 390 px)."""
    parts = family_totals(plan)
    scale_max = max(plan.peak_high_bytes, plan.gpu.memory_bytes, scale_bytes or 0) or 1
    bar_y, bar_h = 22, 28
    legend_entries = len(parts) + (1 if plan.unmeasured_allowance_bytes else 0)
    legend_rows = 0 if compact else (legend_entries + 1) // 2
    height = bar_y + bar_h + 22 + legend_rows * 18
    prefix = f"m{abs(hash((plan.model_name, plan.options.method, plan.peak_bytes))) % 10**8}"
    defs = [_pattern_def(family, f"{prefix}-{family}") for family, _ in parts]
    shapes = []
    x = 0.0
    for family, size in parts:
        w = _pct(size, scale_max)
        shapes.append(
            f'<rect x="{x:.2f}%" y="{bar_y}" width="{max(w, 0.1):.2f}%" height="{bar_h}" fill="{_fill(family, prefix)}" stroke="#fff" stroke-width="1">'
            f"<title>{escape(family)}: {size / GIB:.2f} GiB</title></rect>"
        )
        x += w
    usable_x = _pct(plan.usable_bytes, scale_max)
    total_x = _pct(plan.gpu.memory_bytes, scale_max)
    verdict = plan.verdict
    low_x, high_x = _pct(plan.peak_low_bytes, scale_max), min(_pct(plan.peak_high_bytes, scale_max), 99.8)
    band = f"band {plan.peak_low_bytes / GIB:.2f} to {plan.peak_high_bytes / GIB:.2f} GiB"
    # the high end's allowance for parts no GPU run has measured is drawn dashed: the part of the
    # band that is a hedge, not a measured error
    allowance = plan.unmeasured_allowance_bytes
    measured_x = _pct(plan.peak_high_bytes - allowance, scale_max) if allowance else high_x
    shapes.append(
        f'<g stroke="currentColor" stroke-width="1.5"><title>{band}</title>'
        f'<line x1="{low_x:.2f}%" y1="{bar_y - 3}" x2="{measured_x:.2f}%" y2="{bar_y - 3}"/>'
        f'<line x1="{low_x:.2f}%" y1="{bar_y - 6}" x2="{low_x:.2f}%" y2="{bar_y}"/>'
        f'<line x1="{high_x:.2f}%" y1="{bar_y - 6}" x2="{high_x:.2f}%" y2="{bar_y}"/></g>'
    )
    if allowance:
        shapes.append(
            f'<line class="allowance" x1="{measured_x:.2f}%" y1="{bar_y - 3}" x2="{high_x:.2f}%" y2="{bar_y - 3}" stroke="currentColor" '
            f'stroke-width="1.5" stroke-dasharray="3 2"><title>{allowance / GIB:.2f} GiB allowed for {escape(" and ".join(plan.unmeasured_parts))} '
            "until a GPU run measures it</title></line>"
        )
    shapes.append(f'<line x1="{usable_x:.2f}%" y1="{bar_y - 6}" x2="{usable_x:.2f}%" y2="{bar_y + bar_h + 6}" stroke="currentColor" stroke-width="2" stroke-dasharray="4 2"/>')
    shapes.append(f'<line x1="{min(total_x, 99.8):.2f}%" y1="{bar_y - 6}" x2="{min(total_x, 99.8):.2f}%" y2="{bar_y + bar_h + 6}" stroke="currentColor" stroke-width="1"/>')
    # the label sits on the side of the line with room for it (about 170 px of text)
    anchor = "end" if usable_x > 50 else "start"
    shapes.append(
        f'<text x="{usable_x:.2f}%" y="{bar_y - 9}" font-size="12" text-anchor="{anchor}" fill="currentColor">'
        f"usable {plan.usable_bytes / GIB:.1f} GiB of {plan.gpu.memory_bytes / GIB:.1f} GiB</text>"
    )
    runs_within = ""
    if plan.allocator_release_bytes:
        # a smaller card runs the step too: the allocator releases its cache before running out
        within_x = _pct(plan.runs_within_bytes, scale_max)
        runs_within = f"; runs within {plan.runs_within_bytes / GIB:.2f} GiB"
        shapes.append(f'<line class="runs-within" x1="{within_x:.2f}%" y1="{bar_y}" x2="{within_x:.2f}%" y2="{bar_y + bar_h}" stroke="currentColor" '
                      f'stroke-width="2" stroke-dasharray="1 2"><title>runs within {plan.runs_within_bytes / GIB:.2f} GiB: on a smaller card the allocator '
                      f"releases {plan.allocator_release_bytes / GIB:.2f} GiB of its cache and retries</title></line>")
    shapes.append(f'<text x="0" y="{bar_y + bar_h + 17}" font-size="12" fill="currentColor">peak {plan.peak_bytes / GIB:.2f} GiB per GPU ({band}){runs_within}: {verdict}</text>')
    if not compact:
        for index, (family, size) in enumerate(parts):
            column = "0%" if index % 2 == 0 else "50%"
            ly = bar_y + bar_h + 26 + (index // 2) * 18
            shapes.append(f'<rect x="{column}" y="{ly}" width="14" height="12" fill="{_fill(family, prefix)}" stroke="currentColor"/>')
            # 20 px past the swatch, whatever the width
            shapes.append(f'<text x="{column}" dx="20" y="{ly + 10}" font-size="12" fill="currentColor">{escape(family.replace("_", " "))}: {size / GIB:.2f} GiB</text>')
        if allowance:
            column = "0%" if len(parts) % 2 == 0 else "50%"
            ly = bar_y + bar_h + 26 + (len(parts) // 2) * 18
            shapes.append(f'<svg x="{column}" y="{ly}" width="14" height="12" overflow="visible"><line x1="0" y1="6" x2="14" y2="6" stroke="currentColor" '
                          'stroke-width="1.5" stroke-dasharray="3 2"/></svg>')
            shapes.append(f'<text x="{column}" dx="20" y="{ly + 10}" font-size="12" fill="currentColor">unmeasured allowance: {allowance / GIB:.2f} GiB</text>')
    title = f"Memory per GPU: {plan.peak_bytes / GIB:.2f} GiB predicted ({band}), {plan.usable_bytes / GIB:.2f} GiB usable ({verdict})"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="{height}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title><defs>{''.join(defs)}</defs>{''.join(shapes)}</svg>"
    )


def _data_uri(svg: str) -> str:
    return "data:image/svg+xml," + quote(svg, safe="=:/,.-")  # "#" would start a fragment


def swatch_uri(family: str) -> str:
    """The family's colour and pattern as a 14 x 12 image, for legends written in HTML. An
    <img>, not inline SVG: its pattern ids cannot clash with the bars' on the same page."""
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="14" height="12"><defs>{_pattern_def(family, "p-" + family)}</defs>'
        f'<rect x=".5" y=".5" width="13" height="11" fill="{_fill(family, "p")}" stroke="#333"/></svg>'
    )
    return _data_uri(svg)


def band_swatch_uri() -> str:
    """The band's bracket, as the bars draw it."""
    return _data_uri('<svg xmlns="http://www.w3.org/2000/svg" width="14" height="12"><g stroke="#000" stroke-width="1.5">'
                     '<line x1="1" y1="6" x2="13" y2="6"/><line x1="1" y1="3" x2="1" y2="9"/><line x1="13" y1="3" x2="13" y2="9"/></g></svg>')


def line_swatch_uri(dashed: bool) -> str:
    """The usable-memory line (dashed) or the GPU's total (thin), as the bars draw them."""
    stroke = 'stroke-width="2" stroke-dasharray="4 2"' if dashed else 'stroke-width="1"'
    return _data_uri(f'<svg xmlns="http://www.w3.org/2000/svg" width="14" height="12"><line x1="7" y1="0" x2="7" y2="12" stroke="#000" {stroke}/></svg>')


# -- a run's curves: loss and GPU memory per step ---------------------------------------------------
# Drawn like the bar: x positions in percent, y in pixels, no viewBox, so the lines stretch to any
# width while the text stays 12 px. Each segment is its own <line> (a polyline cannot mix units).

CHART_H = 200
PLOT_TOP, PLOT_BOTTOM = 22, CHART_H - 24
# percent of the width: the plot starts right of the y-axis labels (at 0), which are drawn last,
# over a halo of the page's background, so a curve never hides them on a narrow screen either
X_LEFT, X_RIGHT = 8.0, 99.0
Y_LABEL = 'font-size="12" fill="#555" stroke="#fff" stroke-width="3" paint-order="stroke"'

MAX_POINTS = 400


def _nice_step(span: float, ticks: int = 4) -> float:
    raw = span / ticks if span > 0 else 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """At most MAX_POINTS, keeping the first, the last and the largest of each stride (a peak is never dropped)."""
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    kept = [max(points[i:i + stride], key=lambda p: p[1]) for i in range(0, len(points), stride)]
    return [points[0], *kept[1:-1], points[-1]]


class _Axes:
    def __init__(self, x_min: int, x_max: int, y_min: float, y_max: float):
        self.x_min, self.x_max = x_min, max(x_max, x_min + 1)
        self.y_min, self.y_max = y_min, y_max if y_max > y_min else y_min + 1

    def x(self, step: float) -> float:
        return X_LEFT + (step - self.x_min) / (self.x_max - self.x_min) * (X_RIGHT - X_LEFT)

    def y(self, value: float) -> float:
        return PLOT_BOTTOM - (value - self.y_min) / (self.y_max - self.y_min) * (PLOT_BOTTOM - PLOT_TOP)


def _grid(axes: _Axes, label) -> tuple[list[str], list[str]]:
    """(the grid's lines, drawn first; the y-axis labels, drawn after the curves)."""
    step = _nice_step(axes.y_max - axes.y_min)
    value = math.ceil(axes.y_min / step) * step
    lines, labels = [], []
    while value <= axes.y_max + 1e-12:
        y = axes.y(value)
        lines.append(f'<line x1="0" x2="100%" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        labels.append(f'<text class="y-label" x="0" y="{y - 3:.1f}" {Y_LABEL}>{escape(label(value))}</text>')
        value += step
    return lines, labels


def _x_labels(axes: _Axes) -> list[str]:
    y = CHART_H - 6
    first = f'<text x="{X_LEFT}%" y="{y}" font-size="12" fill="#555">step {axes.x_min}</text>'
    last = f'<text x="{X_RIGHT}%" y="{y}" font-size="12" fill="#555" text-anchor="end">step {axes.x_max}</text>'
    return [first, last]


def _curve(axes: _Axes, points: list[tuple[int, float]], colour: str, label, width: float = 2) -> list[str]:
    points = _thin(points)
    out = [f'<g stroke="{colour}" stroke-width="{width}" stroke-linecap="round">']
    for (s0, v0), (s1, v1) in itertools.pairwise(points):
        out.append(f'<line x1="{axes.x(s0):.2f}%" y1="{axes.y(v0):.1f}" x2="{axes.x(s1):.2f}%" y2="{axes.y(v1):.1f}"/>')
    out.append("</g>")
    if len(points) <= 60:  # markers, each with its value on hover
        out.append(f'<g fill="{colour}">')
        for step, value in points:
            out.append(f'<circle cx="{axes.x(step):.2f}%" cy="{axes.y(value):.1f}" r="3"><title>step {step}: {escape(label(value))}</title></circle>')
        out.append("</g>")
    return out


def _svg(title: str, shapes: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="{CHART_H}" role="img" aria-label="{escape(title)}">'
            f"<title>{escape(title)}</title>{''.join(shapes)}</svg>")


def _empty(title: str, text: str) -> str:
    return _svg(title, [f'<rect x="0" y="{PLOT_TOP}" width="100%" height="{PLOT_BOTTOM - PLOT_TOP}" fill="#f6f6f6"/>',
                        f'<text x="50%" y="{(PLOT_TOP + PLOT_BOTTOM) / 2:.0f}" font-size="13" text-anchor="middle" fill="#555">{escape(text)}</text>'])


def loss_chart_svg(points: list[tuple[int, float]], total_steps: int | None = None) -> str:
    """Training loss per logged step."""
    if not points:
        return _empty("Loss per step: no step logged yet", "no step logged yet")
    values = [v for _, v in points]
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.1 or 0.1
    axes = _Axes(min(s for s, _ in points) if len(points) > 1 else 0, max(total_steps or 0, points[-1][0]), max(0.0, low - pad), high + pad)
    label = lambda v: f"{v:.3g}"
    title = (f"Loss per step: {points[0][1]:.4g} at step {points[0][0]}, {points[-1][1]:.4g} at step {points[-1][0]}"
             f"{f' of {total_steps}' if total_steps else ''}")
    lines, labels = _grid(axes, label)
    shapes = lines + _x_labels(axes) + _curve(axes, points, "#4e79a7", label) + labels
    shapes.append(f'<text x="{X_RIGHT}%" y="14" font-size="12" text-anchor="end" fill="currentColor">loss {points[-1][1]:.4g} at step {points[-1][0]}</text>')
    return _svg(title, shapes)


def memory_chart_svg(points: list[tuple[int, int]], predicted: int, low: int | None, high: int | None,
                     measured_peak: int | None, error_pct: float | None, total_steps: int | None = None, note: str | None = None) -> str:
    """Measured GPU memory per step (reserved plus the CUDA context, the worst rank) against the
    plan's predicted peak (dashed) and its band (shaded, low to high end). Drawn in GiB, so the
    grid falls on round GiB."""
    gib = [(s, v / GIB) for s, v in points]
    top = max([predicted, high or 0, measured_peak or 0, *(v for _, v in points)]) / GIB
    axes = _Axes(min(s for s, _ in points) if len(points) > 1 else 0, max([total_steps or 0, *(s for s, _ in points), 1]), 0, top * 1.12)
    label = lambda v: f"{v:.3g} GiB"
    lines, labels = _grid(axes, label)
    shapes = lines + _x_labels(axes)
    if low is not None and high is not None:
        y_high, y_low = axes.y(high / GIB), axes.y(low / GIB)
        shapes.append(f'<rect x="0" width="100%" y="{y_high:.1f}" height="{max(y_low - y_high, 1):.1f}" fill="#e15759" fill-opacity=".12">'
                      f"<title>the plan's band: {low / GIB:.2f} to {high / GIB:.2f} GiB</title></rect>")
    y_pred = axes.y(predicted / GIB)
    shapes.append(f'<line x1="0" x2="100%" y1="{y_pred:.1f}" y2="{y_pred:.1f}" stroke="#c62828" stroke-width="2" stroke-dasharray="6 4"/>')
    shapes.append(f'<text x="{X_RIGHT}%" y="{y_pred - 5:.1f}" font-size="12" text-anchor="end" fill="#8a1c1c">predicted {predicted / GIB:.2f} GiB</text>')
    if gib:
        shapes += _curve(axes, gib, "currentColor", lambda v: f"{v:.2f} GiB")
    shapes += labels
    if measured_peak is not None and error_pct is not None:
        direction = "above" if error_pct >= 0 else "below"
        result = f"measured peak {measured_peak / GIB:.2f} GiB: the prediction is {abs(error_pct):.1f}% {direction} it"
    elif measured_peak is not None:
        result = f"measured peak {measured_peak / GIB:.2f} GiB"
    else:
        result = note or "no GPU memory measured yet"
    shapes.append(f'<text x="{X_LEFT}%" y="14" font-size="12" fill="currentColor">{escape(result)}</text>')
    band = f" (band {low / GIB:.2f} to {high / GIB:.2f} GiB)" if low is not None and high is not None else ""
    title = f"GPU memory per step against the plan: predicted peak {predicted / GIB:.2f} GiB{band}; {result}"
    return _svg(title, shapes)
