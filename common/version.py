"""The app version a person can look up beside its hash: the project's version and git
commit. Both sides print it: a hospital when it approves an app, the coordinator in the
commands it hands out."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from .paths import project_root


def app_version(project: Path | None) -> str:
    """What a reviewer can check an app hash against: the project's version and, where it is
    a git checkout, its commit (the hash alone names no version a person can look up)."""
    root = project or project_root()
    try:
        version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        version = "?"
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if commit and subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=normal"],
                                     capture_output=True, text=True, timeout=10).stdout.strip():
            commit += " with uncommitted changes"  # untracked, not ignored files too: the app's FAB holds them
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"fedgru {version}" + (f", git {commit}" if commit else "")
