"""The daemon's source opener: a local raw image is looked at (qemu-img, fingerprint)
once per identity, and afresh as soon as the file changes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from liveclone.daemon.opener import SourceOpener
from liveclone.sources import Source, open_source
from liveclone.sources.local import LocalFileSource


def test_a_raw_file_is_looked_at_once_per_identity(tmp_path: Path) -> None:
    img = tmp_path / "golden.img"
    img.write_bytes(os.urandom(1 << 20))
    calls: list[str] = []

    def fallback(spec: str) -> Source:
        calls.append(spec)
        return open_source(spec)

    opener = SourceOpener(fallback)
    first = opener.open(str(img))
    ident = first.identity()
    first.close()
    for _ in range(3):
        again = opener.open(str(img))
        assert isinstance(again, LocalFileSource)
        assert again.identity() == ident  # the same facts, fingerprint included
        again.close()
    assert calls == [str(img)]
    with open(img, "r+b") as f:  # changed: another identity, looked at afresh
        f.write(b"x")
    changed = opener.open(str(img))
    assert changed.identity()["fingerprint"] != ident["fingerprint"]
    changed.close()
    assert calls == [str(img)] * 2


def test_other_formats_and_urls_always_go_to_the_fallback(tmp_path: Path) -> None:
    qcow = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    calls: list[str] = []

    def fallback(spec: str) -> Source:
        calls.append(spec)
        return open_source(spec)

    opener = SourceOpener(fallback)
    for _ in range(2):
        src = opener.open(str(qcow))
        assert not isinstance(src, LocalFileSource)
        src.close()
    assert calls == [str(qcow)] * 2
