"""The report: a table a person reads at a glance (feature x result), the
failures with their smallest failing example as a reproducible call, and
the same as JSON."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from conformance.core import CheckResult, Status

SYMBOL = {
    Status.PASS: "pass",
    Status.FAIL: "FAIL",
    Status.REJECTED: "unsupported, correctly rejected",
    Status.NOT_DECLARED: "not declared",
    Status.SKIPPED: "skipped",
}


def _short(text: str, width: int) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def format_table(results: list[CheckResult], *, details: bool = True) -> str:
    """One row per check: section | feature | result | cases | seconds."""
    rows = [(r.section, r.feature, SYMBOL[r.status], str(r.cases), f"{r.seconds:.1f}s", r.check_id) for r in results]
    head = ("section", "feature", "result", "cases", "time", "check id")
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[1] = min(widths[1], 58)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    last = None
    for row in rows:
        section = row[0] if row[0] != last else ""
        last = row[0]
        cells = (section, _short(row[1], widths[1]), *row[2:])
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def summary_line(results: list[CheckResult]) -> str:
    counts = {s: 0 for s in Status}
    for r in results:
        counts[r.status] += 1
    return (f"{counts[Status.PASS]} pass, {counts[Status.FAIL]} fail, {counts[Status.REJECTED]} unsupported "
            f"(correctly rejected), {counts[Status.NOT_DECLARED]} not declared, {counts[Status.SKIPPED]} skipped")


def format_failure(r: CheckResult) -> str:
    out = [f"FAIL {r.check_id} -- {r.feature}", textwrap.indent(r.message.strip(), "  ")]
    if r.reproducer:
        out.append("  smallest failing example (re-run it with):")
        out.append(textwrap.indent(r.reproducer.strip(), "    "))
    return "\n".join(out)


def format_report(report) -> str:
    head = (f"diffkv conformance -- backend {report.backend} ({report.backend_name}) on {report.device}, "
            f"profile {report.profile}, dtypes {', '.join(report.dtypes) or 'none'}")
    parts = [head, "", format_table(report.results), "", summary_line(report.results) +
             f" -- {report.seconds:.1f}s"]
    fails = report.failed
    if fails:
        parts += ["", f"{len(fails)} failure(s):", ""]
        parts += [format_failure(r) + "\n" for r in fails]
    parts.append("RESULT: " + ("FAILED" if fails else "PASSED"))
    return "\n".join(parts)


def report_json(report) -> dict[str, Any]:
    return {
        "backend": report.backend,
        "backend_name": report.backend_name,
        "device": report.device,
        "profile": report.profile,
        "dtypes": report.dtypes,
        "passed": report.ok,
        "seconds": round(report.seconds, 3),
        "summary": report.counts(),
        "results": [r.to_json() for r in report.results],
    }


def write_json(report, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report_json(report), f, indent=2)
        f.write("\n")
