"""Shared fixtures. Real data is read from ../shared/testdata (never copied here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("TMEQUANT_TESTDATA", REPO.parent / "shared" / "testdata"))


def shared_path(*parts: str) -> Path:
    """Path of a file under ../shared/testdata; skips the test (one line) when absent."""
    p = TESTDATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not found: {p} (set TMEQUANT_TESTDATA)")
    return p


@pytest.fixture
def testdata() -> Path:
    """The shared test-data folder; skips when absent."""
    if not TESTDATA.is_dir():
        pytest.skip(f"shared test data folder not found: {TESTDATA}")
    return TESTDATA


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch deterministic and polite on a 2-core machine during tests."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_tmequant_logging():
    """In-process CLI calls configure the `tmequant` logger (-q, -v); undo that per test."""
    import logging

    from tmequant import progress

    logger = logging.getLogger("tmequant")
    saved = (list(logger.handlers), logger.level, logger.propagate, progress._enabled_default)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]
    progress.set_progress_enabled(saved[3])


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's phantom cache (~/.cache/tmequant)."""
    old = os.environ.get("TMEQUANT_CACHE_DIR")
    os.environ["TMEQUANT_CACHE_DIR"] = str(tmp_path_factory.mktemp("tmequant-cache"))
    yield
    if old is None:
        os.environ.pop("TMEQUANT_CACHE_DIR", None)
    else:
        os.environ["TMEQUANT_CACHE_DIR"] = old


# The quick tier (`pytest -m "not slow"`) leaves out every test whose measured time
# (setup + call + teardown) is over SLOW_S, and the tests sharing a module-scoped fixture
# with one: tests/durations.json, written by
# `python3 -m pytest --store-durations` (a full run; it merges with what is there).
DURATIONS = Path(__file__).with_name("durations.json")
SLOW_S = 1.0


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write each test's time to tests/durations.json (the quick tier's input)")


_times: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _times[report.nodeid] = _times.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if not session.config.getoption("--store-durations") or not _times:
        return
    import json

    old = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    old.update({k: round(v, 3) for k, v in _times.items()})
    DURATIONS.write_text(json.dumps(dict(sorted(old.items())), indent=0) + "\n")


def _shared_fixtures(item) -> set[tuple[str, str]]:
    """(module, name) of the module- or class-scoped fixtures ``item`` uses."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    mod = item.nodeid.split("::")[0]
    return {(mod, name) for name, defs in info.name2fixturedefs.items()
            if defs and defs[-1].scope in ("module", "class")}


def pytest_collection_modifyitems(config, items):
    """Marks the tests measured slower than SLOW_S ``slow``. ``TMEQUANT_TEST_SHUFFLE=<seed>``
    runs the suite in a seeded random order: the modules shuffled, and the tests inside each
    (as pytest-randomly does, so module-scoped fixtures are built once). The suite must pass
    in any order; this checks it without a plugin."""
    if DURATIONS.is_file():
        import json

        measured = json.loads(DURATIONS.read_text())
        slow = {it.nodeid for it in items if measured.get(it.nodeid, 0.0) > SLOW_S}
        # A module-scoped fixture's cost is measured on the first test that uses it; without
        # that test, the next one pays it. So every test sharing such a fixture with a slow
        # test is slow too, and the quick tier never builds it.
        costly = {key for it in items if it.nodeid in slow for key in _shared_fixtures(it)}
        for it in items:
            if it.nodeid in slow or costly & _shared_fixtures(it):
                it.add_marker(pytest.mark.slow)
    seed = os.environ.get("TMEQUANT_TEST_SHUFFLE")
    if not seed:
        return
    import random

    rng = random.Random(int(seed))
    by_module: dict[str, list] = {}
    for it in items:
        by_module.setdefault(it.nodeid.split("::")[0], []).append(it)
    modules = list(by_module)
    rng.shuffle(modules)
    items[:] = [it for m in modules for it in rng.sample(by_module[m], len(by_module[m]))]
