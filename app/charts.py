"""Server-rendered SVG: the plan's components stacked against the GPU's memory.

Readable without colour: every family has its own fill pattern as well as its colour, the
legend repeats the pattern with the name and GiB, and a labelled line marks the usable memory.
"""

from __future__ import annotations

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
    legend_rows = 0 if compact else (len(parts) + 1) // 2
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
    shapes.append(
        f'<g stroke="#000" stroke-width="1.5"><title>{band}</title>'
        f'<line x1="{low_x:.2f}%" y1="{bar_y - 3}" x2="{high_x:.2f}%" y2="{bar_y - 3}"/>'
        f'<line x1="{low_x:.2f}%" y1="{bar_y - 6}" x2="{low_x:.2f}%" y2="{bar_y}"/>'
        f'<line x1="{high_x:.2f}%" y1="{bar_y - 6}" x2="{high_x:.2f}%" y2="{bar_y}"/></g>'
    )
    shapes.append(f'<line x1="{usable_x:.2f}%" y1="{bar_y - 6}" x2="{usable_x:.2f}%" y2="{bar_y + bar_h + 6}" stroke="#000" stroke-width="2" stroke-dasharray="4 2"/>')
    shapes.append(f'<line x1="{min(total_x, 99.8):.2f}%" y1="{bar_y - 6}" x2="{min(total_x, 99.8):.2f}%" y2="{bar_y + bar_h + 6}" stroke="#000" stroke-width="1"/>')
    # the label sits on the side of the line with room for it (about 170 px of text)
    anchor = "end" if usable_x > 50 else "start"
    shapes.append(
        f'<text x="{usable_x:.2f}%" y="{bar_y - 9}" font-size="12" text-anchor="{anchor}">'
        f"usable {plan.usable_bytes / GIB:.1f} GiB of {plan.gpu.memory_bytes / GIB:.1f} GiB</text>"
    )
    shapes.append(f'<text x="0" y="{bar_y + bar_h + 17}" font-size="12">peak {plan.peak_bytes / GIB:.2f} GiB per GPU ({band}): {verdict}</text>')
    if not compact:
        for index, (family, size) in enumerate(parts):
            column = "0%" if index % 2 == 0 else "50%"
            ly = bar_y + bar_h + 26 + (index // 2) * 18
            shapes.append(f'<rect x="{column}" y="{ly}" width="14" height="12" fill="{_fill(family, prefix)}" stroke="#333"/>')
            # 20 px past the swatch, whatever the width
            shapes.append(f'<text x="{column}" dx="20" y="{ly + 10}" font-size="12">{escape(family.replace("_", " "))}: {size / GIB:.2f} GiB</text>')
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
