"""Cloning qcow2, vmdk, vhdx, vdi and vpc images, read through a qemu-nbd child, and
every bad image input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from liveclone.errors import SourceError
from liveclone.sources import image as image_module
from liveclone.sources import open_source
from tests.conftest import LIVECLONE, allocated, make_image, qemu_img_create
from tests.integration.servers import clone_partly, stop, wait_status

SIZE = 32 << 20

# (name, qemu-img format, extra convert options)
FORMATS = [
    ("qcow2", "qcow2", []),
    ("qcow2-compressed", "qcow2", ["-c"]),
    ("vmdk-monolithicSparse", "vmdk", ["-o", "subformat=monolithicSparse"]),
    ("vmdk-streamOptimized", "vmdk", ["-o", "subformat=streamOptimized"]),
    ("vhdx", "vhdx", []),
    ("vdi", "vdi", []),
    ("vpc", "vpc", ["-o", "force_size=on"]),
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300)


def qemu_img(*args: str) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stderr}"



def convert(raw: Path, out: Path, fmt: str, opts: list[str]) -> Path:
    qemu_img("convert", "-f", "raw", "-O", fmt, *opts, str(raw), str(out))
    return out


def assert_same(clone: Path, image: Path, fmt: str, expected: bytes) -> None:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(clone), str(image)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert clone.read_bytes() == expected


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "raw.img"
    return path, make_image(path, SIZE, seed=7)


@pytest.mark.parametrize("name,fmt,opts", FORMATS, ids=[f[0] for f in FORMATS])
def test_clone_image_format(tmp_path: Path, raw: tuple[Path, bytes], name: str, fmt: str,
                            opts: list[str]) -> None:
    src, data = raw
    image = convert(src, tmp_path / f"src.{name}", fmt, opts)
    clone = tmp_path / "clone.img"
    r = run("clone", str(image), str(clone))
    assert r.returncode == 0, r.stderr
    assert_same(clone, image, fmt, data)
    # Holes and zero blocks of the guest disk stay holes.
    assert allocated(clone) <= allocated(src)
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["source"]["kind"] == "image" and st["source"]["format"] == fmt
    assert st["source"]["size"] == SIZE


def test_qcow2_with_backing_file(tmp_path: Path, raw: tuple[Path, bytes]) -> None:
    src, data = raw
    base = convert(src, tmp_path / "base.qcow2", "qcow2", [])
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    # The overlay changes a few ranges; the rest comes from the backing file.
    writes = [(1 << 20, 64 << 10, 0xAB), (5 << 20 | 4096, 8192, 0xCD), (SIZE - 4096, 4096, 1)]
    subprocess.run(["qemu-io", "-f", "qcow2",
                    *[a for off, n, pat in writes for a in ("-c", f"write -P {pat} {off} {n}")],
                    str(top)], check=True, capture_output=True)
    expected = bytearray(data)
    for off, n, pat in writes:
        expected[off:off + n] = bytes([pat]) * n
    clone = tmp_path / "clone.img"
    r = run("clone", str(top), str(clone))
    assert r.returncode == 0, r.stderr
    assert_same(clone, top, "qcow2", bytes(expected))
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert [b["path"] for b in st["source"]["backing"]] == [str(base)]
    assert st["source"]["backing"][0]["format"] == "qcow2"


def test_identity_is_stable_and_notices_changes(tmp_path: Path,
                                                raw: tuple[Path, bytes]) -> None:
    src, _ = raw
    image = convert(src, tmp_path / "src.qcow2", "qcow2", [])
    with open_source(str(image)) as a, open_source(str(image)) as b:
        assert a.identity() == b.identity()
        recorded = a.identity()
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 4096", str(image)],
                   check=True, capture_output=True)
    with open_source(str(image)) as c:
        why = c.identity_mismatch(recorded)
    assert why is not None and "fingerprint" in why and "mtime_ns" in why


def test_changed_image_is_refused_on_resume(tmp_path: Path, raw: tuple[Path, bytes]) -> None:
    src, _ = raw
    image = convert(src, tmp_path / "src.vmdk", "vmdk", [])
    clone = tmp_path / "clone.img"
    clone_partly(str(image), clone)
    before = clone.read_bytes()
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", f"write -P 3 {SIZE - 65536} 4096",
                    str(image)], check=True, capture_output=True)
    r = run("clone", str(image), str(clone))
    assert r.returncode == 4, r.stderr
    assert "changed since" in r.stderr
    assert clone.read_bytes() == before


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def copying_from_qcow2(src: Path, image: Path, clone: Path, rate: str,
                       stderr: int) -> tuple[subprocess.Popen[bytes], int]:
    """A slow ``liveclone clone`` into ``clone`` of ``image``, a qcow2 made from ``src``,
    once it has copied something; returns the process and its one child, the
    qemu-nbd it started."""
    convert(src, image, "qcow2", [])
    proc = subprocess.Popen([LIVECLONE, "clone", str(image), str(clone), "--rate", rate],
                            stderr=stderr)
    try:
        wait_status(clone, lambda s: s["regions_present"] > 0, proc)
        (child,) = children(proc.pid)
    except BaseException:
        stop(proc)
        raise
    return proc, child


def test_qemu_nbd_killed_mid_copy_is_restarted(tmp_path: Path,
                                               raw: tuple[Path, bytes]) -> None:
    src, data = raw
    image, clone = tmp_path / "src.qcow2", tmp_path / "clone.img"
    proc, child = copying_from_qcow2(src, image, clone, "8M", subprocess.PIPE)
    try:
        assert "qemu-nbd" in Path(f"/proc/{child}/cmdline").read_text()
        os.kill(child, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    finally:
        stop(proc)
    assert_same(clone, image, "qcow2", data)
    st = json.loads(run("status", "--json", str(clone)).stdout)
    assert st["phase"] == "complete"
    # The copy went on through a new qemu-nbd, not the one killed.
    assert st["source_status"]["qemu_nbd_restarts"] >= 1, st["source_status"]


def test_no_qemu_nbd_left_behind(tmp_path: Path, raw: tuple[Path, bytes]) -> None:
    src, _ = raw
    image = convert(src, tmp_path / "src.vdi", "vdi", [])
    source = open_source(str(image))
    child = source._child  # type: ignore[attr-defined]
    sock_dir = source._dir  # type: ignore[attr-defined]
    assert child.poll() is None and oct(os.stat(sock_dir).st_mode & 0o777) == "0o700"
    source.close()
    assert child.poll() is not None and not os.path.exists(sock_dir)


def test_encrypted_image(tmp_path: Path) -> None:
    image = tmp_path / "enc.qcow2"
    qemu_img_create("-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                    str(image), "1M")
    r = run("clone", str(image), str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert "is encrypted" in r.stderr and "Decrypt it first" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_missing_backing_file(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    base.unlink()
    r = run("clone", str(top), str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert f"backing file '{base}'" in r.stderr and "qemu-img rebase" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_unsupported_format(tmp_path: Path, raw: tuple[Path, bytes],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A format qemu reads but liveclone is told not to: the refusal names it and the fix.
    image = convert(raw[0], tmp_path / "src.vdi", "vdi", [])
    monkeypatch.setattr(image_module, "FORMATS", ("qcow2",))
    with pytest.raises(SourceError) as info:
        open_source(str(image))
    assert "format 'vdi'" in info.value.message and "qemu-img convert" in info.value.message


def test_corrupt_image(tmp_path: Path, raw: tuple[Path, bytes]) -> None:
    image = convert(raw[0], tmp_path / "src.qcow2", "qcow2", [])
    with open(image, "r+b") as f:  # a qcow2 version nobody knows
        f.seek(4)
        f.write((99).to_bytes(4, "big"))
    r = run("clone", str(image), str(tmp_path / "c.img"))
    assert r.returncode == 3
    assert "qemu-img cannot read image" in r.stderr and "version" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_raw_stays_a_local_file(raw: tuple[Path, bytes]) -> None:
    with open_source(str(raw[0])) as s:
        assert s.fileno() is not None and s.identity()["kind"] == "file"


def test_killed_liveclone_leaves_no_qemu_nbd(tmp_path: Path, raw: tuple[Path, bytes]) -> None:
    proc, child = copying_from_qcow2(raw[0], tmp_path / "src.qcow2", tmp_path / "clone.img",
                                     "2M", subprocess.DEVNULL)
    proc.kill()
    proc.wait()
    assert wait_gone(child), "qemu-nbd outlived the liveclone that started it"


def wait_gone(pid: int, timeout: float = 30) -> bool:
    """True once ``pid`` has exited (gone, or a zombie waiting for init)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
