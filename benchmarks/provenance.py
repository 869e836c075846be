"""Which code a figure comes from. Standard library only: ``scripts/gpu_check.py`` imports it
before any wheel is installed."""

import subprocess
from pathlib import Path


def git_commit(repo: Path, unknown: str = "unknown") -> str:
    """The short commit of ``repo``, with ``+changes`` when tracked files differ from it;
    ``unknown`` where there is no git or no repository."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+changes" if changes else "")
    except (OSError, subprocess.CalledProcessError):
        return unknown
