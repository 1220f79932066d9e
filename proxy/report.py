"""What `seedcache audit` and `seedcache verify` print: the summary as a text table, and the
self-contained HTML page of `audit --html` with its SVG charts drawn here. Pure: no I/O.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.audit import event_time, fingerprint_split
from proxy.divergence import is_divergence
from proxy.recording import printable

# Spans up to this long are charted by hour, longer ones by day.
HOURLY_SPAN = timedelta(days=2)
HISTOGRAM_BINS = 20
WORST_LIMIT = 10
# Colour-blind safe (Okabe-Ito), one per model in the order models first appear.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000")

_COLUMNS = (
    ("model", "model"),
    ("fingerprint", "fingerprint"),
    ("comparisons", "comparisons"),
    ("same output", "same_output"),
    ("divergence", "divergence_rate"),
    ("text ratio", "mean_text_ratio"),
    ("ngram dist", "mean_ngram_distance"),
    ("embedding dist", "mean_embedding_distance"),
    ("fp changes", "fingerprint_changes"),
    # The divergence rate split: where the fingerprint changed, and where it did not (or is null).
    ("div fp changed", "divergence_rate_fingerprint_changed"),
    ("div same fp", "divergence_rate_same_fingerprint"),
)
_RATES = frozenset(
    {"divergence_rate", "divergence_rate_fingerprint_changed", "divergence_rate_same_fingerprint"}
)


# --- text ---------------------------------------------------------------------------------------


def totals(groups: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The groups of `audit.summarise` added up: comparisons, identical, same output,
    divergences, rate (null without comparisons, like the split rates: 0.0 would read as "no
    drift" when nothing was measured)."""
    comparisons = identical = divergences = changes = changed_divergences = models = 0
    for group in groups:
        models += int(group.get("model_changes", 0))
        comparisons += int(group["comparisons"])
        identical += int(group["identical"])
        divergences += int(group["divergences"])
        changes += int(group["fingerprint_changes"])
        changed_divergences += int(group["fingerprint_changed_divergences"])
    return {
        "comparisons": comparisons,
        "identical": identical,
        "same_output": comparisons - divergences,
        "divergences": divergences,
        "divergence_rate": round(divergences / comparisons, 4) if comparisons else None,
        "fingerprint_changes": changes,
        "model_changes": models,
        **fingerprint_split(comparisons, divergences, changes, changed_divergences),
    }


def same_output(overall: Mapping[str, Any]) -> str:
    """ "3 identical", or "3 identical, 1 usage only" when some outputs differ only in usage."""
    identical = int(overall["identical"])
    usage_only = int(overall["same_output"]) - identical
    return (
        f"{identical} identical, {usage_only} usage only"
        if usage_only
        else f"{identical} identical"
    )


def fingerprint_summary(overall: Mapping[str, Any]) -> str:
    """The divergences split by whether the fingerprint changed, as one sentence."""
    changed = int(overall["fingerprint_changes"])
    changed_divergences = int(overall["fingerprint_changed_divergences"])
    same = int(overall["comparisons"]) - changed
    same_divergences = int(overall["divergences"]) - changed_divergences

    def part(divergences: int, comparisons: int, rate: Any) -> str:
        percent = "-" if rate is None else f"{float(rate) * 100:.1f}%"
        return f"{divergences} of {comparisons} diverged ({percent})"

    return (
        f"Fingerprint changed: "
        f"{part(changed_divergences, changed, overall['divergence_rate_fingerprint_changed'])}; "
        f"same or unknown fingerprint: "
        f"{part(same_divergences, same, overall['divergence_rate_same_fingerprint'])}."
    )


def text_table(groups: Sequence[Mapping[str, Any]]) -> str:
    """The per model and fingerprint summary as an aligned plain-text table."""
    rows = [[title for title, _ in _COLUMNS]]
    rows += [[_cell(name, group.get(name)) for _, name in _COLUMNS] for group in groups]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        # Names left-aligned, numbers right-aligned, as in `ls -l`.
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _cell(name: str, value: Any) -> str:
    if value is None or value == "":
        return "null" if name == "fingerprint" else "-"
    if name in _RATES:
        return f"{float(value) * 100:.1f}%"
    if isinstance(value, float):
        return f"{value:.4f}"
    # A model or fingerprint, as a client or the upstream sent it: it must not drive the terminal.
    return printable(value)


# --- HTML ---------------------------------------------------------------------------------------


def html_page(
    events: Sequence[Mapping[str, Any]],
    groups: Sequence[Mapping[str, Any]],
    *,
    source: str,
    generated_at: datetime | None = None,
) -> str:
    """The audit report as one HTML document: no scripts, stylesheets or fonts from elsewhere."""
    generated = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    overall = totals(groups)
    if events:
        summary = (
            f"{overall['comparisons']} comparisons, {same_output(overall)}, "
            f"divergence rate {overall['divergence_rate'] * 100:.1f}%, "
            f"{overall['fingerprint_changes']} fingerprint changes. {fingerprint_summary(overall)}"
        )
        body = "\n".join(
            (
                f"<p>{_e(summary)}</p>",
                _html_table(groups),
                "<h2>Divergence rate over time</h2>",
                rate_chart(events),
                "<h2>Distance distribution</h2>",
                distance_histogram(events),
                "<h2>Worst divergences</h2>",
                _worst_section(events),
            )
        )
    else:
        body = "<p>No audit events: nothing has been compared yet.</p>"
    return _PAGE.format(source=_e(source), generated=_e(generated), body=body)


def rate_chart(events: Sequence[Mapping[str, Any]]) -> str:
    """An SVG line chart of the divergence rate per model, by hour or by day."""
    times = [moment for moment in map(event_time, events) if moment is not None]
    if not times:
        return "<p>No event carries a time.</p>"
    hourly = max(times) - min(times) <= HOURLY_SPAN
    step = timedelta(hours=1) if hourly else timedelta(days=1)
    # model -> bucket start -> [comparisons, divergences]
    series: dict[str, dict[datetime, list[int]]] = {}
    for event in events:
        moment = event_time(event)
        if moment is None:
            continue
        bucket = _bucket(moment, hourly)
        counts = series.setdefault(_model(event), {}).setdefault(bucket, [0, 0])
        counts[0] += 1
        counts[1] += is_divergence(str(event.get("verdict")))
    first = min(b for buckets in series.values() for b in buckets)
    last = max(b for buckets in series.values() for b in buckets)
    width, height, left, right, top, bottom = 720, 260, 48, 16, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    span = (last - first) / step

    def x(bucket: datetime) -> float:
        return left + (plot_w / 2 if span == 0 else (bucket - first) / step / span * plot_w)

    def y(rate: float) -> float:
        return top + (1 - rate) * plot_h

    parts = [_svg_open(width, height, "Divergence rate over time")]
    legend: list[str] = []
    for percent in (0, 25, 50, 75, 100):
        level = y(percent / 100)
        parts.append(
            f'<line x1="{left}" y1="{level:.1f}" x2="{width - right}" y2="{level:.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{level + 4:.1f}" text-anchor="end">'
            f"{percent}%</text>"
        )
    fmt = "%Y-%m-%d %H:00" if hourly else "%Y-%m-%d"
    labels = [(first, "start"), (last, "end")] if span else [(first, "middle")]
    for bucket, anchor in labels:
        parts.append(
            f'<text x="{x(bucket):.1f}" y="{height - bottom + 18}" text-anchor="{anchor}">'
            f"{_e(bucket.strftime(fmt))}</text>"
        )
    for index, (model, buckets) in enumerate(sorted(series.items())):
        colour = PALETTE[index % len(PALETTE)]
        points = [(x(b), y(d / n), b, n, d) for b, (n, d) in sorted(buckets.items())]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, *_ in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}"/>')
        for px, py, bucket, n, d in points:
            label = f"{model} {bucket.strftime(fmt)}: {d}/{n} diverged"
            parts.append(
                f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{colour}">'
                f"<title>{_e(label)}</title></circle>"
            )
        legend.append(f'<span style="color:{colour}">●</span> {_e(model)}')
    parts.append("</svg>")
    note = (
        f"Share of comparisons that diverged, per {'hour' if hourly else 'day'} (a change of "
        "usage alone is no divergence)."
    )
    return (
        "\n".join(parts) + f'\n<p class="legend">{"  ".join(legend)}</p><p class="note">{note}</p>'
    )


def distance_histogram(events: Sequence[Mapping[str, Any]]) -> str:
    """An SVG histogram of the n-gram cosine distances of the events that compared texts."""
    distances = [
        float(value)
        for value in (_similarity(event, "ngram_cosine_distance") for event in events)
        if value is not None
    ]
    if not distances:
        return "<p>No event compared output texts.</p>"
    counts = [0] * HISTOGRAM_BINS
    for distance in distances:
        counts[min(HISTOGRAM_BINS - 1, max(0, math.floor(distance * HISTOGRAM_BINS)))] += 1
    width, height, left, right, top, bottom = 720, 240, 48, 16, 16, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / HISTOGRAM_BINS
    peak = max(counts)
    parts = [_svg_open(width, height, "Distribution of n-gram cosine distances")]
    parts.append(
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        'class="axis"/>'
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 6}" y="{top + plot_h + 4}" text-anchor="end">0</text>'
    )
    for index, count in enumerate(counts):
        low = index / HISTOGRAM_BINS
        bar_h = count / peak * plot_h
        parts.append(
            f'<rect x="{left + index * bar_w + 1:.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{bar_w - 2:.1f}" height="{bar_h:.1f}" fill="{PALETTE[0]}">'
            f"<title>{low:.2f}–{low + 1 / HISTOGRAM_BINS:.2f}: {count}</title></rect>"
        )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<text x="{left + tick * plot_w:.1f}" y="{height - bottom + 18}" '
            f'text-anchor="middle">{tick:g}</text>'
        )
    parts.append("</svg>")
    note = (
        f"{len(distances)} comparisons of output texts; identical outputs are at 0, "
        "unrelated ones near 1."
    )
    return "\n".join(parts) + f'\n<p class="note">{_e(note)}</p>'


def worst_divergences(
    events: Iterable[Mapping[str, Any]], limit: int = WORST_LIMIT
) -> list[Mapping[str, Any]]:
    """The diverged events with the lowest text ratio (those without a ratio last), at most
    `limit`."""
    diverged = [event for event in events if is_divergence(str(event.get("verdict")))]

    def order(event: Mapping[str, Any]) -> tuple[float, str]:
        ratio = _similarity(event, "text_ratio")
        return (ratio if ratio is not None else math.inf, str(event.get("ts", "")))

    return sorted(diverged, key=order)[:limit]


def _worst_section(events: Sequence[Mapping[str, Any]]) -> str:
    worst = worst_divergences(events)
    if not worst:
        return "<p>No divergences.</p>"
    sections = []
    for event in worst:
        recorded, live = _texts(event)
        ratio = _similarity(event, "text_ratio")
        distance = _similarity(event, "ngram_cosine_distance")
        facts = [
            f"key {str(event.get('key', ''))[:12]}",
            f"model {event.get('model')}",
            f"verdict {event.get('verdict')}",
            f"fingerprint {event.get('recorded_fingerprint')} → {event.get('live_fingerprint')}",
            f"text ratio {'-' if ratio is None else f'{ratio:.3f}'}",
            f"ngram distance {'-' if distance is None else f'{distance:.3f}'}",
            str(event.get("ts", "")),
        ]
        sections.append(
            f'<section class="pair"><p class="facts">{_e(" · ".join(facts))}</p>'
            '<div class="side"><h3>recorded</h3>'
            f"<pre>{_e(recorded)}</pre></div>"
            '<div class="side"><h3>live</h3>'
            f"<pre>{_e(live)}</pre></div></section>"
        )
    return "\n".join(sections)


def _texts(event: Mapping[str, Any]) -> tuple[str, str]:
    texts = event.get("texts")
    if isinstance(texts, Mapping):
        return str(texts.get("recorded", "")), str(texts.get("live", ""))
    # Events written before texts were logged: the differing values are all there is.
    differences = [d for d in event.get("differences") or () if isinstance(d, Mapping)]
    recorded = "\n".join(f"{d.get('path')}: {d.get('recorded')}" for d in differences)
    live = "\n".join(f"{d.get('path')}: {d.get('live')}" for d in differences)
    return recorded, live


def _html_table(groups: Sequence[Mapping[str, Any]]) -> str:
    head = "".join(f"<th>{_e(title)}</th>" for title, _ in _COLUMNS)
    rows = "".join(
        "<tr>"
        + "".join(f"<td>{_e(_cell(name, g.get(name)))}</td>" for _, name in _COLUMNS)
        + "</tr>"
        for g in groups
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _svg_open(width: int, height: int, label: str) -> str:
    # Inline SVG in HTML needs no xmlns, so the page names no external address at all.
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(label)}">'
    )


def _bucket(moment: datetime, hourly: bool) -> datetime:
    moment = moment.astimezone(UTC)
    if hourly:
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _model(event: Mapping[str, Any]) -> str:
    # GET /v1/models names no model.
    return str(event.get("model") or event.get("response_model") or "(no model)")


def _similarity(event: Mapping[str, Any], name: str) -> float | None:
    similarity = event.get("similarity")
    value = similarity.get(name) if isinstance(similarity, Mapping) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _e(text: str) -> str:
    return html.escape(text, quote=True)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>seedcache audit</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ font-size: 1.2em; margin-top: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }}
th:nth-child(-n+2), td:nth-child(-n+2) {{ text-align: left; }}
svg {{ font: 11px sans-serif; display: block; max-width: 100%; height: auto; }}
svg .grid {{ stroke: #e4e4e4; }} svg .axis {{ stroke: #888; }} svg polyline {{ stroke-width: 2; }}
.note, .facts {{ color: #555; }} .legend {{ margin: 4px 0; white-space: pre-wrap; }}
.pair {{ display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 1.5em; }}
.pair .facts {{ flex-basis: 100%; margin: 0; }}
.side {{ flex: 1 1 400px; min-width: 0; }}
.side h3 {{ font-size: 1em; margin: 0 0 4px; }}
pre {{ white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: 8px;
      margin: 0; }}
</style>
</head>
<body>
<h1>seedcache audit</h1>
<p class="note">Events from {source}, generated {generated}.</p>
{body}
</body>
</html>
"""
