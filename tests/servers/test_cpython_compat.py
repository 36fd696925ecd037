"""CPython's own Lib/test/test_socketserver.py (3.11 to 3.13), run against `servers`.

The stdlib suite imports `socketserver`; the child process puts `servers` in its place in
sys.modules first. It runs in a subprocess so that the substitution, the suite's forks and its
reap_children() (which waits for any child) stay out of the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
from servers_testing import run_python

# MiscTestCase.test_all compares each name's __module__ with "socketserver": servers defines its
# classes in servers.base, servers.stream, ... by design. Everything else must pass.
EXCLUDED = {"test.test_socketserver.MiscTestCase.test_all"}
# How many tests each version's suite holds (checked with 3.11.7, 3.12.1 and 3.13.0), so that a
# suite that loads fewer (an import problem skipping a class) cannot pass.
EXPECTED_TESTS = {(3, 11): 26, (3, 12): 26, (3, 13): 26}

RUNNER = textwrap.dedent(
    """
    import json, sys, unittest

    import servers

    sys.modules["socketserver"] = servers
    import test.support

    # test_socketserver calls requires("network") at import and skips everything without it.
    test.support.use_resources = ["network"]
    from test import test_socketserver

    assert test_socketserver.socketserver is servers, test_socketserver.socketserver

    def flatten(suite):
        for test in suite:
            if isinstance(test, unittest.TestSuite):
                yield from flatten(test)
            else:
                yield test

    excluded = set(json.loads(sys.argv[1]))
    loaded = list(flatten(unittest.defaultTestLoader.loadTestsFromModule(test_socketserver)))
    tests = [t for t in loaded if t.id() not in excluded]
    assert len(loaded) - len(tests) == len(excluded), "an excluded test no longer exists"
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(unittest.TestSuite(tests))
    print(json.dumps({
        "ran": result.testsRun,
        "failures": [t.id() for t, _ in result.failures],
        "errors": [t.id() for t, _ in result.errors],
        "skipped": [t.id() for t, _ in result.skipped],
        "expected_failures": len(result.expectedFailures),
        "unexpected_successes": len(result.unexpectedSuccesses),
    }))
    """
)


def test_cpython_test_socketserver_passes() -> None:
    expected = EXPECTED_TESTS.get(sys.version_info[:2])
    if expected is None:
        pytest.skip(f"no expected test count for Python {sys.version.split()[0]}")
    if importlib.util.find_spec("test.test_socketserver") is None:
        pytest.skip("this Python was installed without its test suite")
    proc = run_python(["-c", RUNNER, json.dumps(sorted(EXCLUDED))], timeout=90)
    output = f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {
        "ran": expected,
        "failures": [],
        "errors": [],
        "skipped": [],
        "expected_failures": 0,
        "unexpected_successes": 0,
    }, output


def test_every_public_name_of_this_pythons_socketserver_is_in_servers() -> None:
    import socketserver

    import servers

    missing = [name for name in socketserver.__all__ if name not in servers.__all__]
    assert not missing, f"socketserver names servers lacks: {missing}"
    assert all(hasattr(servers, name) for name in servers.__all__)
