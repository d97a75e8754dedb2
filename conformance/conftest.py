"""pytest glue of the conformance suite (active only when ``conformance/``
itself is collected): short option aliases, the Triton interpreter on a
machine without CUDA, and the report at the end of the run."""

from __future__ import annotations

import os

import torch

from conformance import plugin

if not torch.cuda.is_available():
    # test harness, not library: Triton kernels can only run in the interpreter here,
    # which must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    # --diffkv-* (if the entry-point plugin is not loaded) and the short aliases --backend, --device, ...
    plugin.add_options(parser, aliases=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from conformance.report import format_table, summary_line, write_json
    from conformance.session import peek_session

    session = peek_session(config)
    if session is None or session.ctx is None or not session.results:
        return
    rep = session.report()
    tr = terminalreporter
    tr.section(f"diffkv conformance: {rep.backend} ({rep.backend_name}) on {rep.device}, profile {rep.profile}")
    tr.write_line(format_table(rep.results))
    tr.write_line(summary_line(rep.results))
    if session.report_path:
        write_json(rep, session.report_path)
        tr.write_line(f"JSON report written to {session.report_path}")
