"""A second Triton for the tests: triton==3.6.0 (the GPU machine's) installed beside the project's own.

``site()`` installs the wheel once into ``.cache/triton36/site`` (``pip install --no-deps --target``: Triton
declares no runtime dependency, so nothing else, and never a torch, is pulled) and returns that folder; a
subprocess with it first on ``PYTHONPATH`` imports Triton 3.6 while torch, numpy and the rest still come from this
venv. ``POP_FX_TRITON36`` names another such folder (one made elsewhere, on a machine without the registry).
About 4 s the first time from a local wheel cache (it is 188 MB), nothing after that.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VERSION = "3.6.0"


def is_current() -> bool:
    """Whether this process already runs Triton 3.6 (then the tests that start a 3.6 subprocess do nothing)."""
    import triton

    return triton.__version__.startswith(VERSION.rsplit(".", 1)[0] + ".")


def site() -> Path:
    """The folder holding Triton 3.6, installed on first use; raises RuntimeError if pip cannot install it."""
    given = os.environ.get("POP_FX_TRITON36")
    if given:
        return Path(given)
    target = ROOT / ".cache" / "triton36" / "site"
    marker = target / f"triton-{VERSION}.ok"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "install.lock", "w") as lock:  # one installer at a time (pytest-xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix="site."))
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                               "--disable-pip-version-check", "--target", str(tmp), f"triton=={VERSION}"],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"pip could not install triton=={VERSION}: {proc.stderr[-2000:]}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        marker.touch()
    return target


def env(**extra: str) -> dict:
    """os.environ with Triton 3.6 first on PYTHONPATH, then the source tree."""
    path = os.pathsep.join([str(site()), str(ROOT)])
    return dict(os.environ, PYTHONPATH=path, **extra)
