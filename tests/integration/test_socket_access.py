"""Who may connect to a served clone (issue 14 for libvirt, invariant 11): the socket
gets the owner and mode asked for from its first moment, never bits for others; a
second server on a clone's default socket is "in use" (exit 7)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

from tests.conftest import LIVECLONE, make_image


def test_socket_owner_and_mode_let_one_other_user_in(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    data = make_image(src, 4 << 20)
    # The socket's directory must be reachable by the user named (pytest's is 0700).
    public = Path(tempfile.mkdtemp(prefix="lc-sock-", dir="/tmp"))
    os.chmod(public, 0o755)
    sock = public / "s.sock"
    clone = tmp_path / "c.img"
    serve = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone), "--socket", str(sock),
                              "--socket-owner", "nobody", "--socket-mode", "0600"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        uri = serve.stdout.readline().strip()
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o600
        assert st.st_uid == pwd.getpwnam("nobody").pw_uid
        # The user named reads the export, byte for byte...
        out = public / "out"
        out.touch()
        os.chown(out, pwd.getpwnam("nobody").pw_uid, -1)
        r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                            "qemu-img", "dd", "-f", "raw", "-O", "raw", f"if={uri}",
                            f"of={out}", "bs=64k", "count=4"], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == data[:256 << 10]
        # ...and another unprivileged user cannot connect.
        r = subprocess.run(["setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups",
                            "qemu-img", "info", uri], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=60)
        shutil.rmtree(public, ignore_errors=True)
    assert "for guestfish and virt-* tools: nbd:///c.img?socket=" in err


def test_world_accessible_socket_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    clone = tmp_path / "c.img"
    r = subprocess.run([LIVECLONE, "serve", str(src), str(clone), "--socket-mode", "0666"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "every user" in r.stderr
    assert not clone.exists() and not Path(str(clone) + ".lcmap").exists()
    r = subprocess.run([LIVECLONE, "serve", str(src), str(clone), "--socket-owner",
                        "no-such-user-here"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no user 'no-such-user-here'" in r.stderr


def test_second_server_on_a_clone_is_busy(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    clone = tmp_path / "c.img"
    first = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None
        assert first.stdout.readline().startswith("nbd+unix://")
        r = subprocess.run([LIVECLONE, "serve", str(src), str(clone)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 7 and "in use" in r.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
