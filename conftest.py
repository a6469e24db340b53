from contextlib import contextmanager

import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run paper-scale tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="paper-scale run; use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interrupt_after(monkeypatch):
    """interrupt_after(module, name, n): a block in which module.name raises KeyboardInterrupt (as a
    Ctrl-C would) on its call n + 1; the original function is back after the block."""
    @contextmanager
    def patched(module, name: str, n: int):
        real, calls = getattr(module, name), []

        def counting(*args, **kwargs):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        try:
            yield
        finally:
            monkeypatch.setattr(module, name, real)
    return patched
