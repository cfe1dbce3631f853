"""scripts/bootstrap.sh: ./tandem (no extras) and ./test (dev) alternate without reinstalling."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bootstrap(root: Path, extras: str) -> None:
    script = f'. "{ROOT}/scripts/bootstrap.sh"; tandem_bootstrap "{root}" "{extras}"'
    subprocess.run(["bash", "-c", script], check=True, capture_output=True, timeout=30)


def checkout(tmp_path: Path) -> Path:
    """A checkout whose .venv python only records how it was called (as pip), in pip.log."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/pip.log"\n')
    python.chmod(0o755)
    return tmp_path


def installs(root: Path) -> list[str]:
    """What each `pip install -e` installed, in order."""
    log = root / "pip.log"
    return [x.split()[-1] for x in log.read_text().splitlines() if " -e " in x] if log.exists() else []


def test_alternating_extras_installs_each_set_once(tmp_path):
    root = checkout(tmp_path)
    for extras in ("", "dev", "", "dev", ""):
        bootstrap(root, extras)
    assert installs(root) == [str(root), f"{root}[dev]"]
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    bootstrap(root, "")  # a changed pyproject reinstalls, keeping the dev extra
    assert installs(root)[2:] == [f"{root}[dev]"]


def test_a_stamp_in_the_old_format_is_understood(tmp_path):
    root = checkout(tmp_path)
    digest = subprocess.run(["sha256sum", str(root / "pyproject.toml")], capture_output=True, text=True).stdout
    (root / ".venv" / ".tandem-installed").write_text(digest[:16] + "-dev\n")
    bootstrap(root, "dev")
    bootstrap(root, "")
    assert installs(root) == []
