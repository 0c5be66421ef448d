"""A pytest plugin (loaded by conftest.py): under the environment variable CI, a skipped test or a
skipped module is a failure, so nothing the project ships goes untested unseen; only the skips in
ALLOWED (hardware CI does not have, named in the reason) stay skips. Outside CI skips are skips.

Also the hypothesis profile "ci" (loaded under CI): no deadline (a loaded 2-core machine is slow,
not wrong) and derandomized, so a CI run is the same run every time.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import settings

ALLOWED = (
    re.compile(r"^needs (cuda|mps)\b"),  # the CUDA / MPS halves of device tests: CI has no GPU
)

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def _ci() -> bool:
    return bool(os.environ.get("CI"))


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip(report, what: str) -> None:
    reason = skip_reason(report)
    if not any(p.search(reason) for p in ALLOWED):
        report.outcome = "failed"
        report.longrepr = f"{what} skipped under CI, where nothing the project ships may be skipped: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _ci() and report.skipped and not hasattr(report, "wasxfail"):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_collectreport(report):
    if _ci() and report.skipped:  # a module-level skip (importorskip, allow_module_level)
        _fail_skip(report, report.nodeid)
