"""Where relative paths in a config point.

Relative paths in a config (data, outcomes, run folders) are relative to the project
folder, the one holding ``pyproject.toml``, so ``flwr run .`` finds
``../shared/data/physionet2012`` even though Flower runs the app from a copy under
``~/.flwr``. The project folder is, in order: ``$FEDGRU_PROJECT_ROOT``; the folder
fedgru was pip-installed from; the folder above this package when it holds
``pyproject.toml``; the current directory.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse


@lru_cache(maxsize=1)
def project_root() -> Path:
    env = os.environ.get("FEDGRU_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    installed = _installed_from()
    if installed is not None:
        return installed
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "configs").is_dir():
        return here
    return Path.cwd()


def _installed_from() -> Path | None:
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        text = distribution("fedgru").read_text("direct_url.json")
    except (ImportError, PackageNotFoundError, FileNotFoundError):
        return None
    if not text:
        return None
    try:
        url = json.loads(text).get("url", "")
    except ValueError:
        return None
    parsed = urlparse(url)
    if parsed.scheme != "file":
        return None
    path = Path(unquote(parsed.path))
    return path if (path / "pyproject.toml").is_file() else None


def resolve(path: str | Path) -> Path:
    """Absolute paths as they are; relative ones against the project folder.

    When the project-relative path does not exist but a cwd-relative one does, the
    latter wins (a user running from another folder with their own relative path).
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    in_project = project_root() / p
    if in_project.exists():
        return in_project
    in_cwd = Path.cwd() / p
    if in_cwd.exists():
        return in_cwd
    return in_project


def cache_dir() -> Path:
    """Where simulations and bedside commands cache derived data (preprocessed patient
    tensors); never inside ../shared, readable by its owner only (0700). A deployed
    hospital never uses it: its tensors live in its own folder (client.export)."""
    env = os.environ.get("FEDGRU_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedgru"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    if base.stat().st_uid == os.getuid() and base.stat().st_mode & 0o077:
        os.chmod(base, 0o700)
    return base
