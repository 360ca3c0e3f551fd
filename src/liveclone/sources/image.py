"""Disk image formats (qcow2, vmdk, vhdx, vdi, vpc, qed) through a qemu-nbd child.

``open_image`` asks ``qemu-img info --output=json --backing-chain`` what a path
is. A raw image stays a ``LocalFileSource`` (fastest: ``copy_file_range``,
SEEK_DATA). Any other format is never parsed here: liveclone starts
``qemu-nbd --read-only`` on a private unix socket and reads the guest-visible
disk, backing chain included, with its NBD client (``NbdSource``). The child is
supervised: if it dies, the next retry of a failed read starts it again; it is
stopped on ``close``.

Identity: for the image and each backing file, its path, size, mtime and inode;
plus the format, the virtual size and a fingerprint of sampled guest blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from liveclone.errors import SourceError
from liveclone.nbdwire.client import Address
from liveclone.process import stop_process
from liveclone.sources.base import Source
from liveclone.sources.nbd import NbdSource
from liveclone.sources.retry import RetryPolicy, TransientError

#: formats handed to qemu-nbd; others (luks, dmg, ...) get a clear refusal
FORMATS = ("qcow2", "qed", "vmdk", "vhdx", "vdi", "vpc", "qcow", "parallels", "bochs",
           "cloop", "dmg")
# Connections qemu-nbd accepts; the pool uses them all.
SHARED = 8
START_TIMEOUT = 30.0
INFO_TIMEOUT = 60.0


def open_image(path: str) -> Source:
    """The source for a local file that might be an image (``open_source`` opens
    the others, and plain raw files, itself): raw as a file, other formats through
    qemu-nbd."""
    from liveclone.sources.local import LocalFileSource

    if shutil.which("qemu-img") is None:  # nothing to ask: read it as raw
        return LocalFileSource(path)
    chain = image_info(path)
    top = chain[0]
    if top.get("format") == "raw" and len(chain) == 1:
        return LocalFileSource(path)
    return ImageSource(os.path.abspath(path), chain)


def image_info(path: str) -> list[dict[str, Any]]:
    """qemu-img's description of the image and its backing chain, checked for what
    liveclone cannot read: missing backing files, encryption, unknown formats."""
    try:
        r = subprocess.run(["qemu-img", "info", "--output=json", "--backing-chain", path],
                           capture_output=True, text=True, timeout=INFO_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise SourceError(f"qemu-img info {path} did not answer in {INFO_TIMEOUT:.0f}s") \
            from None
    if r.returncode != 0:
        err = _last_line(r.stderr)
        backing = _missing_backing(path)
        if backing is not None:
            raise SourceError(
                f"the backing file {backing!r} of image {path} cannot be opened ({err}). "
                "Put the backing file where the image expects it, or point the image at "
                "it with `qemu-img rebase -u -b BACKING -F FORMAT IMAGE`"
            )
        if "lock" in err.lower():
            raise SourceError(
                f"image {path} is in use by a program that writes it ({err}); stop that "
                "program (or the VM) before cloning, so the source cannot change"
            )
        raise SourceError(f"qemu-img cannot read image {path}: {err}")
    chain: list[dict[str, Any]] = json.loads(r.stdout)
    for layer in chain:
        fmt = layer.get("format")
        name = layer.get("filename", path)
        if layer.get("encrypted"):
            raise SourceError(
                f"image {name} is encrypted and liveclone cannot be given its key. "
                "Decrypt it first, e.g. `qemu-img convert --object secret,id=s,file=KEYFILE "
                "--image-opts encrypt.key-secret=s,file.filename=IMAGE -O qcow2 PLAIN.qcow2`, "
                "and clone the decrypted copy"
            )
        if fmt != "raw" and fmt not in FORMATS:
            raise SourceError(
                f"image {name} has the format {fmt!r}, which liveclone does not read "
                f"(it reads raw, {', '.join(FORMATS[:6])} ...). Convert it first: "
                "`qemu-img convert -O raw IMAGE OUT.img`"
            )
    return chain


def _missing_backing(path: str) -> str | None:
    """The first backing file of the chain that does not exist, if any. Plain
    ``qemu-img info`` does not open backing files, so it works on a broken chain."""
    while True:
        r = subprocess.run(["qemu-img", "info", "--output=json", path],
                           capture_output=True, text=True, timeout=INFO_TIMEOUT)
        if r.returncode != 0:
            return None
        info = json.loads(r.stdout)
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if not backing:
            return None
        if not os.path.exists(backing):
            return str(backing)
        path = backing


class ImageSource(NbdSource):
    """A non-raw image read through a supervised ``qemu-nbd`` child."""

    def __init__(self, path: str, chain: list[dict[str, Any]],
                 policy: RetryPolicy | None = None) -> None:
        self.path = path
        self.format = str(chain[0]["format"])
        self.chain = chain
        self._files = [os.path.abspath(str(layer.get("filename", path))) for layer in chain]
        self._dir = tempfile.mkdtemp(prefix="liveclone-nbd-")  # mode 0700: private
        self._sock = os.path.join(self._dir, "nbd.sock")
        self._log = os.path.join(self._dir, "qemu-nbd.log")
        self._child: subprocess.Popen[bytes] | None = None
        self._child_lock = threading.Lock()
        # The parent-death signal fires when the *thread* that forked exits, so
        # every qemu-nbd is started from this one thread, which lives until close.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="qemu-nbd-spawner")
        self.restarts = 0
        try:
            self._spawner.submit(self._start_child).result()
            super().__init__(Address(socket_path=self._sock), path, policy,
                             pool_size=SHARED, what=f"{self.format} image")
        except BaseException:
            self._stop_child()
            self._spawner.shutdown()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    # -- the child -------------------------------------------------------------------

    def _start_child(self) -> None:
        """Start qemu-nbd and wait until it accepts connections."""
        if os.path.exists(self._sock):
            os.unlink(self._sock)
        argv = ["qemu-nbd", "--read-only", "--persistent", f"--shared={SHARED}",
                f"--format={self.format}", f"--socket={self._sock}", "--cache=writeback",
                "--aio=threads", self.path]
        with open(self._log, "wb") as log:
            # Its own session, so a Ctrl-C reaches liveclone, which commits and then
            # stops it; and a death signal, so a killed liveclone leaves no qemu-nbd.
            self._child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=log,
                                           start_new_session=True,
                                           preexec_fn=_die_with_parent())
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(self._sock):
            if self._child.poll() is not None:
                raise SourceError(
                    f"qemu-nbd could not open {self.format} image {self.path}: "
                    f"{_last_line(self._read_log())}"
                )
            if time.monotonic() > deadline:
                raise SourceError(f"qemu-nbd did not start serving {self.path} in "
                                  f"{START_TIMEOUT:.0f}s")
            time.sleep(0.005)

    def _read_log(self) -> str:
        try:
            with open(self._log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        stop_process(child)

    def _before_retry(self) -> None:
        """Restart qemu-nbd if it died; the pool then makes fresh connections."""
        with self._child_lock:
            if self._child is not None and self._child.poll() is None:
                return
            self.restarts += 1
            self.pool.reset()
            try:
                self._spawner.submit(self._start_child).result()
            except SourceError as e:
                raise TransientError(f"restarting qemu-nbd: {e.message}") from None

    # -- the Source interface ------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        files = []
        for name in self._files:
            st = os.stat(name)
            files.append({"path": name, "file_size": st.st_size,
                          "mtime_ns": st.st_mtime_ns, "inode": st.st_ino})
        top, backing = files[0], files[1:]
        return {
            "kind": "image",
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "file_size": top["file_size"],
            "mtime_ns": top["mtime_ns"],
            "inode": top["inode"],
            "fingerprint": self.fingerprint(),
            "backing": [{**f, "format": layer.get("format")}
                        for f, layer in zip(backing, self.chain[1:], strict=True)],
        }

    def status(self) -> dict[str, Any]:
        return {**super().status(), "qemu_nbd_restarts": self.restarts}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_child()
            self._spawner.shutdown()
            shutil.rmtree(self._dir, ignore_errors=True)


def _die_with_parent() -> Callable[[], None]:
    """A preexec function asking Linux to SIGTERM the child when its parent dies.
    libc is looked up before the fork: the child only makes the one call."""
    import ctypes
    import ctypes.util

    prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"
