"""The in-process format probe (``sources.local.is_plain_raw``) against real
``qemu-img``: a file the probe calls plain raw must be raw to ``qemu-img info``, for
every format qemu-img creates here; ordinary raw disks take the fast path."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from liveclone.sources import open_source
from liveclone.sources.image import ImageSource
from liveclone.sources.local import LocalFileSource, is_plain_raw
from tests.conftest import qemu_img_create

CREATE = {
    "qcow2": ["-f", "qcow2"], "qcow": ["-f", "qcow"], "qed": ["-f", "qed"],
    "vmdk": ["-f", "vmdk"], "vmdk-flat": ["-f", "vmdk", "-o", "subformat=monolithicFlat"],
    "vmdk-stream": ["-f", "vmdk", "-o", "subformat=streamOptimized"],
    "vdi": ["-f", "vdi"], "vhdx": ["-f", "vhdx"], "vpc": ["-f", "vpc"],
    "vpc-fixed": ["-f", "vpc", "-o", "subformat=fixed"], "parallels": ["-f", "parallels"],
    "luks": ["-f", "luks", "--object", "secret,id=s,data=pw", "-o", "key-secret=s"],
}


def qemu_format(path: Path) -> str:
    r = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                       capture_output=True, text=True, check=True)
    fmt: str = json.loads(r.stdout)["format"]
    return fmt


@pytest.mark.parametrize("kind", sorted(CREATE))
def test_probe_never_calls_an_image_raw(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"disk.{kind}"
    qemu_img_create(*CREATE[kind], str(path), "4M")
    images = [path, *(p for p in tmp_path.iterdir() if p != path)]  # vmdk-flat's extent
    for p in images:
        if is_plain_raw(str(p)):
            assert qemu_format(p) == "raw", p
    if qemu_format(path) != "raw":
        assert not is_plain_raw(str(path))


def test_raw_disks_take_the_fast_path(tmp_path: Path) -> None:
    rng = random.Random(5)
    samples = {
        "zeros": bytes(1 << 20),
        "sparse": b"",  # a hole only
        "mbr": bytes(446) + rng.randbytes(64) + b"\x55\xaa" + rng.randbytes(1 << 20),
        **{f"random{i}": b"\x00" + rng.randbytes(1 << 20) for i in range(4)},
    }
    for name, data in samples.items():
        p = tmp_path / f"{name}.img"
        with open(p, "wb") as f:
            f.truncate(1 << 20)
            f.write(data)
        assert qemu_format(p) == "raw"
        assert is_plain_raw(str(p)), name
        src = open_source(str(p))
        try:
            assert isinstance(src, LocalFileSource)
        finally:
            src.close()


def test_short_or_text_files_go_to_qemu_img(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    text = tmp_path / "desc.img"
    text.write_bytes(b"# a text file\n" + bytes(1024))
    dmg = tmp_path / "a.dmg"
    dmg.write_bytes(bytes(4096))
    for p in (tiny, text, dmg):
        assert not is_plain_raw(str(p))
    src = open_source(str(text))  # qemu-img says raw: still a local file
    try:
        assert not isinstance(src, ImageSource)
    finally:
        src.close()
