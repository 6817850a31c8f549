"""Targets as rows a benchmark checks and prints: what, the measured value, the limit, met or not
(and by how much when not). Shared by ``eval`` (long context) and ``bench memory`` (runtime); no torch."""
from __future__ import annotations


def check(rows: list, target: str, value: float, limit: float, at_most: bool = True, percent: bool = False):
    """Append one target row: ``value`` must stay <= ``limit`` (``at_most``) or reach it."""
    rows.append({"target": target, "value": float(value), "limit": float(limit), "percent": percent,
                 "met": bool(value <= limit if at_most else value >= limit), "at_most": at_most})


def table(rows: list) -> str:
    """The rows as a markdown table; a missed target says by how much."""
    lines = ["| target | measured | limit | met |", "|---|---|---|---|"]
    for r in rows:
        percent = r.get("percent", "%" in r["target"])
        fmt = (lambda x: f"{100 * x:.1f}%") if percent else (lambda x: f"{x:.2f}")
        if r["met"]:
            verdict = "yes"
        elif percent:
            verdict = f"no (by {100 * abs(r['value'] - r['limit']):.1f} points)"
        else:
            verdict = f"no (by {100 * abs(r['value'] / r['limit'] - 1):.1f}%)"
        lines.append(f"| {r['target']} | {fmt(r['value'])} | {fmt(r['limit'])} | {verdict} |")
    return "\n".join(lines)
