"""libguestfs against `liveclone serve` while the clone copies: a read-only guestfish
session reads the original files, a read-write one writes a file that ends up in
the finished clone.

guestfish and virt-* take the export as ``nbd:///EXPORT?socket=PATH`` (libguestfs's
own URI form), not the ``nbd+unix://`` form that serve prints for QEMU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from guest.appliance import libguestfs_env
from guest.build import build_guest, file_content
from guest.checks import debugfs_cat, e2fsck, finish_copy

LIVECLONE = [sys.executable, "-m", "liveclone.cli.main"]
TEXT = "written by guestfish into a clone that was still copying"


def guestfish(env: dict[str, str], uri: str, *commands: list[str], ro: bool) -> str:
    """One guestfish session running ``commands`` (each an argv) on ``uri``."""
    argv = ["guestfish", *(["--ro"] if ro else []), "--format=raw", "-a", uri]
    for i, cmd in enumerate(commands):
        argv += ([":"] if i else []) + cmd
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def copying(clone: Path) -> bool:
    st = json.loads(subprocess.run([*LIVECLONE, "status", str(clone), "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    return bool(st["running"]) and st["regions_present"] < st["regions_total"]


def test_guestfish_reads_and_writes_a_copying_clone(tmp_path: Path) -> None:
    env = libguestfs_env()
    guest = build_guest()
    src, clone, sock = tmp_path / "src.img", tmp_path / "clone.img", tmp_path / "clone.sock"
    shutil.copyfile(guest.disk, src)
    serve = subprocess.Popen([*LIVECLONE, "serve", str(src), str(clone), "--socket", str(sock),
                              "--rate", "256K"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        printed = serve.stdout.readline().strip()
        assert printed == f"nbd+unix:///clone.img?socket={sock}"
        uri = f"nbd:///clone.img?socket={sock}"  # the form libguestfs takes
        out = tmp_path / "twelve.bin"
        listing = guestfish(env, uri, ["run"], ["mount-ro", "/dev/sda", "/"],
                            ["ls", "/data"], ["download", "/data/twelve-meg.bin", str(out)],
                            ro=True)
        assert "twelve-meg.bin" in listing.split()
        assert out.read_bytes() == file_content("twelve-meg.bin")
        assert copying(clone)
        guestfish(env, uri, ["run"], ["mount", "/dev/sda", "/"], ["mkdir-p", "/new"],
                  ["write", "/new/guestfish.txt", TEXT], ["umount-all"], ro=False)
        assert copying(clone)  # both sessions ran before the copy ended
    finally:
        serve.terminate()
        serve.communicate(timeout=60)
    finish_copy(src, clone)
    e2fsck(clone)
    assert debugfs_cat(clone, "new/guestfish.txt").decode() == TEXT
