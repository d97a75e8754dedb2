"""pytest plugin of the conformance suite (registered through the pytest11 entry point)."""


def pytest_addoption(parser):
    group = parser.getgroup("diffkv-conformance")
    group.addoption("--backend", action="store", default=None,
                    help="backend under test: 'reference', 'triton' or 'package.module:Class'")
