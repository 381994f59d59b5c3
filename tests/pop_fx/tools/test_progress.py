"""pop_fx.tools.progress: a line per phase and a heartbeat while one runs."""

import io
import time

from pop_fx.tools.progress import Progress


def test_progress_beats_while_a_phase_runs():
    buf = io.StringIO()
    log = Progress(stream=buf, heartbeat_s=0.05)
    log("loading")
    with log.phase("compiling"):
        time.sleep(0.18)
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("] loading") and lines[1].endswith("] compiling ...")
    assert any("compiling: 0 s so far" in x for x in lines) and "done in" in lines[-1]
    assert all(x.startswith("[") and " s] " in x for x in lines)
