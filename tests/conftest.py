"""Session-wide fixtures: one real nats-server for the whole session (tests use real servers, never mocks)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Generator, Iterator

import hypothesis  # noqa: F401  # loaded now: its plugin's late import at session end can hit a CPython 3.11
import pytest  # compile bug ("AST constructor recursion depth mismatch") while engine threads still run

from transport.nats_server import EmbeddedNatsServer

os.environ.setdefault("DROVER_OBSERVABILITY__EXPORTER", "none")
os.environ.setdefault("DROVER_AUDIT__PATH", "")  # audit records go to the log only (tests that read them set a file)
# Cluster contexts (`drover up` records one) go to a file of this session, never the user's ~/.config/drover.
os.environ.setdefault("DROVER_CONTEXT", os.path.join(tempfile.mkdtemp(prefix="drover-test-context-"), "contexts.json"))
logging.getLogger("nats").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNatsServer]:
    # the session's main thread starts it: a killed test run takes its server along (no orphan holding ports)
    server = EmbeddedNatsServer(die_with_parent=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedNatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def span_exporter():  # type: ignore[no-untyped-def]
    """An in-memory span exporter on this process's tracer provider (set once per process)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop every actor a test left running: pykka threads are not daemons and would keep pytest alive."""
    import pykka

    pykka.ActorRegistry.stop_all(block=True, timeout=10)
    gc.unfreeze()  # the last collection sees every object (see _LAST_OF_MODULE)
    leaks = _unattributed + asyncio_leaks.take()
    if leaks:  # reported after the test that caused them had finished: fail the session instead
        print(f"\nasyncio leaks outside any test: {leaks[:5]}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------------------------------------------ asyncio hygiene
ASYNCIO_LEAKS = ("Task was destroyed but it is pending", "was never awaited", "Event loop is closed")
"""What asyncio reports, through its logger, warnings or unraisable exceptions (never as an error), when code
leaves tasks pending at shutdown or never awaits a coroutine: each is a bug (work silently dropped)."""


class _LeakWatch(logging.Handler):
    """Collects asyncio's leak reports from its logger and the unraisable hook (warnings arrive through
    :func:`pytest_warning_recorded`)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.found: list[str] = []
        self._previous_hook = sys.unraisablehook

    def emit(self, record: logging.LogRecord) -> None:
        self.check(record.getMessage())

    def check(self, text: str) -> None:
        if any(marker in text for marker in ASYNCIO_LEAKS):
            self.found.append(" ".join(line.strip() for line in text.splitlines()[:3])[:500])  # what, and which task

    def install(self) -> None:
        logging.getLogger("asyncio").addHandler(self)
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def _unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        self.check(f"{unraisable.exc_value!r} in {unraisable.object!r}")
        self._previous_hook(unraisable)

    def take(self) -> list[str]:
        gc.collect()  # a pending task is reported when it is collected
        found, self.found = self.found, []
        return found


asyncio_leaks = _LeakWatch()


def pytest_configure(config: pytest.Config) -> None:
    asyncio_leaks.install()


# Every test collects garbage four times (above and below). A full collection walks every tracked object:
# ~390k once the suite is collected (torch imported), ~700k once vLLM is (from tests/control/test_errors.py
# on), 0.2-0.4 s of CPU each: a trivial test cost ~1.5 s of CPU with both imported. So what is alive when a
# module's tests begin (imported modules, session fixtures) is frozen (gc.freeze: left out of collections,
# still freed by reference counting), and each test's collections walk only what was made since. At the end
# of each module everything is unfrozen and collected once in full (its last test's teardown report):
# garbage among the frozen objects (a session object dropped in the middle of a module, say) is found
# there, failing that teardown (tests/test_asyncio_hygiene.py checks it), and at session end.
_LAST_OF_MODULE = pytest.StashKey[bool]()


def pytest_collection_finish(session: pytest.Session) -> None:
    gc.collect()
    gc.freeze()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    item.stash[_LAST_OF_MODULE] = nextitem is None or nextitem.path != item.path


def pytest_warning_recorded(warning_message: warnings.WarningMessage, when: str, nodeid: str, location: object) -> None:
    asyncio_leaks.check(str(warning_message.message))


_unattributed: list[str] = []  # leaks reported after a test's teardown (warnings of a module's fixtures)


@pytest.fixture(autouse=True)
def _no_asyncio_leaks() -> Iterator[None]:
    """Fail a test that leaves asyncio tasks pending or coroutines never awaited."""
    _unattributed.extend(asyncio_leaks.take())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
        gc.collect()  # an unawaited coroutine warns when it is collected
    for w in caught:
        if "never awaited" in str(w.message):
            asyncio_leaks.check(str(w.message))
        else:  # every other warning goes on to pytest's summary
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    found = asyncio_leaks.take()
    if found:
        pytest.fail(f"asyncio leaks (tasks pending at shutdown, coroutines never awaited): {found[:5]}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Leaks while fixtures stop (a module's cluster, say) fail the teardown of the test that stopped them."""
    report = yield
    if call.when != "teardown":
        return report
    module_end = item.stash.get(_LAST_OF_MODULE, True)
    if module_end:
        gc.unfreeze()  # this collection walks every object (see _LAST_OF_MODULE)
    if report.passed:
        found = asyncio_leaks.take()
        if found:
            report.outcome = "failed"
            report.longrepr = f"asyncio leaks while stopping fixtures: {found[:5]}"
    elif module_end:
        gc.collect()  # garbage is never frozen (what it reports goes to the next test's start)
    if module_end:
        gc.freeze()
    return report
