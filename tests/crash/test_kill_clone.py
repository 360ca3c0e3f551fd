"""kill -9 a real ``liveclone clone`` at random points, rerun it, check the result.

The finished clone must equal the source byte for byte and be as sparse as it.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

from tests.conftest import LIVECLONE, allocated, make_image

KILLS = 24


def test_kill9_and_resume_many_times(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_image(src, 96 << 20, seed=3)  # about 48 MiB of data
    clone = tmp_path / "clone.img"
    rng = random.Random(11)
    kills = 0
    for _ in range(KILLS):
        # Kill anywhere from start-up to a couple of periodic commits in.
        p = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "4M"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.6))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.wait()
        # Whatever point it died at, the committed map only vouches for correct data.
        if clone.exists() and Path(str(clone) + ".lcmap").exists():
            st = subprocess.run([LIVECLONE, "status", "--json", str(clone)],
                                capture_output=True, text=True)
            assert st.returncode == 0, st.stderr
    assert kills >= 20
    done = subprocess.run([LIVECLONE, "clone", str(src), str(clone)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert clone.read_bytes() == data
    assert allocated(clone) <= allocated(src)
    # The digests survived every kill: each region has its digest, and all match.
    ver = subprocess.run([LIVECLONE, "verify", "--json", "--against-source", str(clone)],
                         capture_output=True, text=True)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    rep = json.loads(ver.stdout)
    assert rep["matched"] == rep["source_matched"] == rep["regions_total"], rep


def test_sigterm_commits_and_resume_continues(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_image(src, 32 << 20, seed=5)
    clone = tmp_path / "clone.img"
    p = subprocess.Popen([LIVECLONE, "clone", str(src), str(clone), "--rate", "8M"],
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    p.terminate()
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    assert "resume" in err
    st = subprocess.run([LIVECLONE, "status", "--json", str(clone)], capture_output=True,
                        text=True, check=True)
    status = json.loads(st.stdout)
    assert status["phase"] == "paused" and not status["running"]
    assert 0 < status["regions_committed"] < status["regions_total"]
    subprocess.run([LIVECLONE, "clone", str(src), str(clone)], check=True)
    assert clone.read_bytes() == data
