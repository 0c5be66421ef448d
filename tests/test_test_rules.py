"""The suite's own rules, checked on small pytest runs of their own: under CI a skip fails (but for
the allowed hardware skips), a test that hangs is stopped by the per-test timeout, and hypothesis
runs its fixed CI profile."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPS = {
    "test_skips.py": """
import pytest

def test_needs_a_network():
    pytest.skip("needs a network")

@pytest.mark.skipif(True, reason="chromium is missing")
def test_needs_chromium():
    pass

def test_needs_cuda():
    pytest.skip("needs cuda")

def test_runs():
    pass
""",
    "test_module_skip.py": """
import pytest
pytest.importorskip("a_module_nobody_ships")

def test_never_collected():
    pass
""",
}


def run(pytester, monkeypatch, ci: bool, *args, files=SKIPS):
    """pytest in a folder of its own with this suite's plugin (tests/ci_rules.py) and its options."""
    if ci:
        monkeypatch.setenv("CI", "1")
    else:
        monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    pytester.makepyfile(**files)
    return pytester.runpytest_subprocess("-p", "ci_rules", "-p", "no:cacheprovider", *args)


def test_under_ci_a_skip_fails_but_a_hardware_one(pytester, monkeypatch):
    result = run(pytester, monkeypatch, ci=True)
    # the skip in the test fails it; the skipif (setup) and the skipped module (collection) are errors
    result.assert_outcomes(passed=1, failed=1, skipped=1, errors=2)
    assert result.ret != 0
    out = result.stdout.str()
    assert "skipped under CI" in out and "needs a network" in out and "chromium is missing" in out
    assert "a_module_nobody_ships" in out
    plain = run(pytester, monkeypatch, ci=False)
    plain.assert_outcomes(passed=1, skipped=4)
    assert plain.ret == 0


def test_a_test_that_hangs_is_stopped_by_the_timeout(pytester, monkeypatch, pytestconfig):
    assert 60 <= float(pytestconfig.getini("timeout")) <= 600  # this suite's: generous for a loaded 2-core CI
    extra = re.search(r"^test = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert '"pytest-timeout' in extra and '"matplotlib' in extra  # installed by scripts/setup.sh, as CI does
    hang = {"test_hang.py": "import time\n\ndef test_hangs():\n    time.sleep(60)\n"}
    result = run(pytester, monkeypatch, False, "-o", "timeout=2", files=hang)
    result.assert_outcomes(failed=1)
    assert "Timeout" in result.stdout.str()


def test_hypothesis_runs_the_ci_profile_under_ci(pytester, monkeypatch):
    probe = {"test_profile.py": """
from hypothesis import settings

def test_profile():
    assert settings.default.derandomize and settings.default.deadline is None
"""}
    run(pytester, monkeypatch, True, files=probe).assert_outcomes(passed=1)
    run(pytester, monkeypatch, False, files=probe).assert_outcomes(failed=1)
