"""``passes`` is a generic top-level name: pop_fx must import pop-fx's own, never a folder or package that shadows it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, code):
    shadow = tmp_path / "passes"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("FOREIGN = True\n")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_a_passes_folder_in_the_working_directory_does_not_shadow_ours(tmp_path):
    r = _run(tmp_path, "import pop_fx, passes, passes.pipeline; print(passes.DISTRIBUTION, passes.__file__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "pop-fx" and str(ROOT / "passes") in r.stdout


def test_a_foreign_passes_imported_first_is_a_clear_error(tmp_path):
    r = _run(tmp_path, "import passes\nimport pop_fx")
    assert r.returncode != 0
    assert "pop-fx needs its own 'passes' package" in r.stderr, r.stderr
