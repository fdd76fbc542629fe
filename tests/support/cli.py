"""The console script as a user runs it, and the one-line error every CLI failure must be."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# The console script installed beside this interpreter (the venv's), not whatever is on PATH.
ORTSERVE = shutil.which("ortserve", path=str(Path(sys.executable).parent)) or "ortserve"


def ortserve(
    *args: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`ortserve ARGS` (env: the whole environment, None: this one); fails the test on a
    non-zero exit when `check`."""
    result = subprocess.run([ORTSERVE, *args], capture_output=True, text=True, env=env,
                            timeout=300)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"ortserve {' '.join(args)} failed:\n{result.stderr}")
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and fragment in lines[-1], result.stderr
