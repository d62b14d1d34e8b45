"""Results of a harness run: scenarios and rows, the statistics, the table, the JSON and the chart.

Pure: no processes, no sockets.  How ratios are computed: samples are
taken in rounds, every contender once per round in a rotated order, so the
``i``-th sample of a contender and the ``i``-th of the baseline were
measured minutes apart at most.  A row's ratio is the median, over rounds,
of its sample divided by the baseline's sample of the same round.  On a
shared, noisy machine that is steadier than a ratio of medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MATPLOTLIB_HINT = "--plot needs matplotlib: pip install 'trio-activate[bench]' (or pip install matplotlib)"


@dataclass
class Row:
    """One contender in one scenario: its samples (NaN for a failed one), errors, notes."""

    contender: str
    label: str
    samples: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def add_errors(self, errors: dict[str, int]) -> None:
        for kind, count in errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + count

    @property
    def values(self) -> list[float]:
        return [s for s in self.samples if math.isfinite(s)]

    @property
    def median(self) -> float | None:
        values = self.values
        return statistics.median(values) if values else None

    @property
    def low(self) -> float | None:
        return min(self.values, default=None)

    @property
    def high(self) -> float | None:
        return max(self.values, default=None)


@dataclass
class Scenario:
    id: str
    title: str
    unit: str
    better: str
    """"higher" or "lower"."""
    baseline: str | None = "trio"
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    show_delta: bool = False
    """Also say how far each median is from the baseline's, in the unit (start-up time, memory)."""
    per_request: bool = False
    """A cost per request: also say how many requests per CPU-second that is, against the baseline."""

    def row(self, contender: str) -> Row | None:
        return next((r for r in self.rows if r.contender == contender), None)

    def baseline_row(self) -> Row | None:
        return self.row(self.baseline) if self.baseline is not None else None

    def ratio(self, row: Row) -> float | None:
        """Median over rounds of row / baseline, each pair from the same round."""
        base = self.baseline_row()
        if base is None or base.skipped is not None or row.skipped is not None:
            return None
        return paired_ratio(row.samples, base.samples)

    def delta(self, row: Row) -> float | None:
        """Median over rounds of row - baseline, each pair from the same round, as ``ratio``.

        Paired, because this machine has slow spells that move every contender
        of a round together: a difference of medians mixes them in.
        """
        base = self.baseline_row()
        if base is None or base.skipped is not None or row.skipped is not None:
            return None
        differences = [
            a - b
            for a, b in zip(row.samples, base.samples, strict=False)
            if math.isfinite(a) and math.isfinite(b)
        ]
        return statistics.median(differences) if differences else None


def paired_ratio(samples: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Median over rounds of ``samples[i] / baseline[i]`` (for callers outside a ``Scenario``)."""
    ratios = [
        a / b for a, b in zip(samples, baseline, strict=False) if math.isfinite(a) and math.isfinite(b) and b
    ]
    return statistics.median(ratios) if ratios else None


# --- formatting ---------------------------------------------------------------------------------


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "requests"):
        return f"{value:,.0f}"
    if unit in ("ms", "µs"):
        return f"{value:.1f}"
    if unit == "MiB":
        return f"{value:.1f}"
    return f"{value:g}"


def format_delta(value: float, unit: str) -> str:
    return f"{value:+.1f} {unit} vs trio"


def format_errors(errors: dict[str, int]) -> str:
    failed = {kind: count for kind, count in errors.items() if count}
    if not failed:
        return ""
    return "errors: " + ", ".join(f"{kind} {count:,}" for kind, count in failed.items())


def table_rows(scenarios: Sequence[Scenario]) -> list[list[str]]:
    rows: list[list[str]] = []
    for scenario in scenarios:
        title = f"{scenario.title} ({scenario.unit}, {scenario.better} is better)"
        if scenario.skipped is not None:
            rows.append([title, "-", "-", "-", "-", f"skipped: {scenario.skipped}"])
            continue
        for row in scenario.rows:
            if row.skipped is not None:
                rows.append([title, row.label, "-", "-", "-", f"skipped: {row.skipped}"])
                continue
            ratio = scenario.ratio(row)
            notes = list(row.notes)
            if scenario.show_delta and row.contender != scenario.baseline:
                delta = scenario.delta(row)
                if delta is not None:
                    notes.insert(0, format_delta(delta, scenario.unit))
            if scenario.per_request and ratio and row.contender != scenario.baseline:
                notes.insert(0, f"{1 / ratio:.2f}x the requests per CPU-second of trio")
            errors = format_errors(row.errors)
            if errors:
                notes.insert(0, errors)
            spread = f"{format_value(row.low, scenario.unit)} - {format_value(row.high, scenario.unit)}"
            rows.append(
                [
                    title,
                    row.label,
                    format_value(row.median, scenario.unit),
                    spread,
                    f"{ratio:.2f}x" if ratio is not None else "-",
                    "; ".join(notes),
                ]
            )
        for note in scenario.notes:
            rows.append([title, "", "", "", "", note])
    return rows


def render_table(scenarios: Sequence[Scenario]) -> str:
    """The results as a Markdown table: it reads in a terminal and pastes into README.md."""
    header = ["Scenario", "Contender", "Median", "Min - max", "vs Trio", "Notes"]
    body = table_rows(scenarios)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    previous = None
    for cells in body:
        shown = list(cells)
        if shown[0] == previous:
            shown[0] = ""  # the scenario's name once, on its first row
        else:
            previous = shown[0]
        lines.append("| " + " | ".join(" ".join(c.replace("|", "/").split()) for c in shown) + " |")
    return "\n".join(lines)


def render_machine(machine: dict[str, Any], settings: dict[str, Any]) -> str:
    tools = f"wrk {machine.get('wrk') or 'absent'}, nginx {machine.get('nginx') or 'absent'}"
    return (
        f"Machine: {machine['cores']} cores ({machine['cpu']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}, trio {machine['trio']}, trio-activate {machine['trio_activate']} "
        f"({machine.get('install', 'unknown')} install, commit {machine.get('commit', 'unknown')}), "
        f"{tools}; load average {machine['loadavg']} at start.\n"
        f"Settings: {settings['rounds']} round(s) of {settings['seconds']}s per load run, "
        f"wrk -t1 -c{settings['connections']}, server pinned to CPU {settings['server_cpus']}, "
        f"wrk to CPU {settings['wrk_cpus']} (scenario 5 and 6 unpinned); "
        f"{settings['startup_runs']} start-up run(s), {settings['rss_runs']} memory run(s), "
        f"{settings['reloads']} reload(s)."
    )


# --- JSON ---------------------------------------------------------------------------------------


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def to_json(
    scenarios: Sequence[Scenario], machine: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """Everything the table shows and the raw samples, with NaN as null (valid JSON)."""
    return {
        "machine": machine,
        "settings": settings,
        "scenarios": [
            {
                "id": s.id,
                "title": s.title,
                "unit": s.unit,
                "better": s.better,
                "baseline": s.baseline,
                "skipped": s.skipped,
                "notes": s.notes,
                "rows": [
                    {
                        "contender": r.contender,
                        "label": r.label,
                        "skipped": r.skipped,
                        "samples": [_finite(v) for v in r.samples],
                        "median": r.median,
                        "min": r.low,
                        "max": r.high,
                        "ratio": s.ratio(r) if r.skipped is None else None,
                        "delta": s.delta(r) if s.show_delta and r.skipped is None else None,
                        "errors": r.errors,
                        "notes": r.notes,
                    }
                    for r in s.rows
                ],
            }
            for s in scenarios
        ],
    }


# --- the chart ----------------------------------------------------------------------------------


def check_plotting() -> None:
    """Fail before measuring anything, rather than after, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(MATPLOTLIB_HINT) from None


def plot(scenarios: Sequence[Scenario], title: str, out: Path) -> None:
    """The table as bar charts: one panel per scenario, median bars, min-max whiskers, ratios written on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in scenarios if s.skipped is None and any(r.median is not None for r in s.rows)]
    shown_count = max(len(shown), 1)
    columns = 2 if shown_count > 1 else 1
    lines = math.ceil(shown_count / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(7 * columns, 2.6 * lines + 0.8), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax, scenario in zip(flat, shown, strict=False):
        rows = [r for r in scenario.rows if r.median is not None]
        medians = [r.median or 0.0 for r in rows]
        below = [(r.median or 0.0) - (r.low or 0.0) for r in rows]
        above = [(r.high or 0.0) - (r.median or 0.0) for r in rows]
        colors = ["#888888" if r.contender == scenario.baseline else "#3070b0" for r in rows]
        positions = list(range(len(rows)))
        ax.barh(positions, medians, xerr=[below, above], color=colors, capsize=3)
        ax.set_yticks(positions, [r.label for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{scenario.title} ({scenario.better} is better)", fontsize=9)
        ax.set_xlabel(scenario.unit, fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        for position, row in zip(positions, rows, strict=True):
            ratio = scenario.ratio(row)
            if scenario.baseline is None:
                text, color = f" {format_value(row.median, scenario.unit)} {scenario.unit}", "black"
            elif ratio is not None:
                text, color = f" {ratio:.2f}x", "white"
            else:
                continue
            ax.text(0, position, text, va="center", ha="left", fontsize=7, color=color)
    for ax in flat[len(shown) :]:
        ax.axis("off")
    if not shown:
        flat[0].text(0.5, 0.5, "no scenario ran", ha="center", va="center")
    figure.suptitle(title, fontsize=9)
    height = 2.6 * lines + 0.8
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.55 / height))  # room for the two-line title
    figure.savefig(out, dpi=110)
    plt.close(figure)
