"""Power cuts and kill -9 at random moments under a served, copying, compacting
clone, with real processes (``liveclone serve``, ``qemu-io``) on a filesystem that
loses unsynced data (plfs). See ``trial.py`` for what one trial does and checks;
``scripts/powerloss-soak.py`` runs thousands of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.powerloss import powerloss_mount
from tests.powerloss.trial import make_source, run_trial

TRIALS = int(os.environ.get("LIVECLONE_POWERLOSS_TRIALS", "100"))
SIZE = 8 << 20


def test_power_cuts_lose_nothing_acknowledged(tmp_path: Path) -> None:
    source = tmp_path / "src.img"
    data = make_source(source, SIZE, seed=1)
    failures = []
    kinds = {"cut": 0, "kill": 0, "cut@journal": 0, "cut@clone": 0, "cut@torn": 0,
             "cut@digest": 0}
    acked = partial = 0
    with powerloss_mount(tmp_path, seed=11) as fs:
        for seed in range(TRIALS):
            res = run_trial(fs, tmp_path, source, data, seed)
            kinds[res.kind] += 1
            acked += res.acked_batches
            partial += res.partial_after > 0
            if res.error is not None:
                failures.append(f"trial {seed} ({res.kind}): {res.error}")
                if len(failures) >= 3:
                    break
    assert not failures, "\n".join(failures)
    # The trials exercised what they claim to: both kinds, acknowledged flushes, and
    # partial writes into absent regions whose committed sub-blocks the crash kept.
    assert all(kinds.values()) and acked > TRIALS, (kinds, acked)
    assert partial >= TRIALS // 10, partial
