"""The reference fixtures (tests/fixtures/reference/): which kind each folder is, what a folder of
that kind holds, which test file tests it, and the error each check reached when it was recorded.

Every folder there is claimed by exactly one kind or listed in EXEMPT with the reason, and has its
kind's files; `tests/test_parity.py::test_every_fixture_folder_is_claimed_and_complete` fails
otherwise, so a new folder is never silently left out.

Achieved errors are kept in tests/fixtures/reference_errors.json, one per (folder, quantity):
`check_error` fails when an error reaches the tolerance, or grows above 10x its recorded value
(a regression long before it reaches the tolerance). Run the parity tests with
SCD_RECORD_ERRORS=1 to write the errors they reach (after a deliberate change, or for a new folder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
ERRORS = Path(__file__).parent / "fixtures" / "reference_errors.json"
TOL = 1e-4
REGRESSION = 10.0  # an error this many times its recorded value fails
FLOOR = 1e-7  # recorded errors below this count as this (a bit-exact 0 must not forbid any rounding)

CASE = ("case.json", "case.safetensors", "options.yml")
# kind: (folder name pattern, files each folder of the kind holds, the test files that test it)
KINDS = {
    "case": (r"case\d+", CASE + ("ema.pth",), ("test_parity.py", "test_convert.py")),
    "casecfgdec": (r"casecfgdec\d+", CASE + ("ema.pth",), ("test_parity.py", "test_convert.py")),
    "far": (r"far\d+", CASE + ("far.pth",), ("test_parity.py", "test_convert.py")),
    "far_long": (r"far\d+_long", ("far_long.pth", "options.yml"), ("test_convert.py",)),  # weights only: no run recorded
    "fardcae": (r"fardcae\d+", CASE + ("far.pth", "dcae.pth", "dcae_config.json"), ("test_parity.py", "test_convert.py")),
    "farlabel": (r"farlabel\d+", CASE + ("far.pth",), ("test_parity.py", "test_convert.py")),
    # Self-Forcing Wan2.1: its own parity tests, which say what its folders hold
    "sfwan": (r"sfwan\d+", (), ("test_wan_parity.py",)),
}
EXEMPT: dict[str, str] = {}  # folder name: why no test reads it
FILES = {"README.md"}  # the plain files allowed beside the folders


def kind_of(name: str) -> list[str]:
    """The kinds whose pattern the folder name matches (exactly one for a claimed folder)."""
    return [kind for kind, (pattern, _, _) in KINDS.items() if re.fullmatch(pattern, name)]


def folders(kind: str) -> list[str]:
    """Every folder of `kind`, complete or not (an incomplete one fails its tests, it is not dropped)."""
    return sorted(p.name for p in REFERENCE.iterdir() if p.is_dir() and kind in kind_of(p.name))


def recorded() -> dict[str, float]:
    return json.loads(ERRORS.read_text()) if ERRORS.exists() else {}


def check_error(folder: str, quantity: str, err: float) -> None:
    """Fail if `err` (the max abs error of `quantity` in `folder`) reaches TOL or regressed above
    REGRESSION x its recorded value; with SCD_RECORD_ERRORS=1 record it instead."""
    key = f"{folder}/{quantity}"
    assert err < TOL, f"{key} differs by {err:.3g} (tolerance {TOL:g})"
    if os.environ.get("SCD_RECORD_ERRORS") == "1":
        errors = recorded()
        errors[key] = float(f"{err:.3g}")
        ERRORS.write_text(json.dumps(dict(sorted(errors.items())), indent=1) + "\n")
        return
    errors = recorded()
    assert key in errors, f"no recorded error for {key} in {ERRORS.name}: run the test with SCD_RECORD_ERRORS=1"
    limit = REGRESSION * max(errors[key], FLOOR)
    assert err <= limit, (f"{key} differs by {err:.3g}, more than {REGRESSION:g}x the {errors[key]:.3g} recorded "
                          f"in {ERRORS.name}: a regression (or re-record it with SCD_RECORD_ERRORS=1 if intended)")
