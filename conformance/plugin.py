"""pytest plugin of the conformance suite (registered through the pytest11
entry point ``diffkv_conformance``).

It is loaded by every pytest session of anyone who has diffkv installed, so
it only *adds options* -- prefixed ``--diffkv-`` so they clash with no other
project -- and imports nothing heavy. The suite itself runs only when its
tests are collected::

    pytest --pyargs conformance --diffkv-backend package.module:BackendClass   # installed package
    pytest conformance --backend package.module:BackendClass                   # from the repository

(``conformance/conftest.py`` adds the short aliases ``--backend``,
``--device``, ``--profile``, ``--report`` where no other plugin owns them.)
"""

from __future__ import annotations

OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--diffkv-backend", dict(dest="diffkv_backend", default=None, metavar="MODULE:CLASS",
                              help="conformance suite: backend under test ('package.module:BackendClass', "
                                   "'reference' or 'triton')")),
    ("--diffkv-device", dict(dest="diffkv_device", default=None, choices=("cpu", "cuda"),
                             help="conformance suite: device (default: cuda if available and declared, else cpu)")),
    ("--diffkv-profile", dict(dest="diffkv_profile", default=None, choices=("quick", "thorough"),
                              help="conformance suite: quick (default) or thorough")),
    ("--diffkv-report", dict(dest="diffkv_report", default=None, metavar="OUT.json",
                             help="conformance suite: also write the report as JSON")),
    ("--diffkv-checks", dict(dest="diffkv_checks", default=None, metavar="PATTERNS",
                             help="conformance suite: only checks whose id matches these comma-separated globs")),
    ("--diffkv-dtypes", dict(dest="diffkv_dtypes", default=None, metavar="LIST",
                             help="conformance suite: only these declared dtypes, e.g. float16,float32")),
)

ALIASES = {"--diffkv-backend": "--backend", "--diffkv-device": "--device", "--diffkv-profile": "--profile",
           "--diffkv-report": "--report"}


def add_options(parser, *, aliases: bool = False) -> None:
    """Register the options (skipping any name already registered, e.g. when
    both this plugin and ``conformance/conftest.py`` are active)."""
    group = parser.getgroup("diffkv-conformance", "diffkv conformance suite")
    for name, kwargs in OPTIONS:
        names = [name] + ([ALIASES[name]] if aliases and name in ALIASES else [])
        for n in names:
            try:
                group.addoption(n, **kwargs)
            except ValueError:  # already registered (by this plugin, or another plugin owns the short name)
                pass


def pytest_addoption(parser):
    add_options(parser)
