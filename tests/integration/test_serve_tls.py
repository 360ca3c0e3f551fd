"""``liveclone serve --tls-certificates``: TLS required, checked with real clients
(nbdinfo, qemu-img, and liveclone's own NBD client) while the clone is still copying."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from liveclone.process import stop_process
from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import free_port, make_pki

SIZE = 8 << 20


def test_serve_requires_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    src, clone = tmp_path / "src.img", tmp_path / "clone.img"
    data = make_image(src, SIZE, seed=21)
    port = free_port()
    proc = subprocess.Popen([LIVECLONE, "serve", str(src), str(clone), "--listen",
                             f"127.0.0.1:{port}", "--export-name", "disk",
                             "--tls-certificates", str(pki), "--rate", "1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri == f"nbds://127.0.0.1:{port}/disk"
        secure = f"nbds://localhost:{port}/disk?tls-certificates={pki}"
        info = subprocess.run(["nbdinfo", "--json", secure], capture_output=True,
                              text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["export-size"] == SIZE
        # qemu-img reads the whole disk through TLS while the copy runs.
        r = subprocess.run(
            ["qemu-img", "compare", "--object",
             f"tls-creds-x509,id=tls0,endpoint=client,dir={pki}", "--image-opts",
             f"driver=nbd,host=localhost,port={port},export=disk,tls-creds=tls0",
             f"driver=raw,file.driver=file,file.filename={src}"],
            capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        # liveclone's own client clones the served clone over nbds://.
        copy = tmp_path / "copy.img"
        r = subprocess.run([LIVECLONE, "clone", secure, str(copy)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert copy.read_bytes() == data
        # Plain NBD is refused with TLS required, and nothing is served.
        plain = subprocess.run(["nbdinfo", f"nbd://localhost:{port}/disk"],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
        r = subprocess.run([LIVECLONE, "clone", f"nbd://localhost:{port}/disk",
                            str(tmp_path / "plain.img")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 3 and "requires TLS: use nbds://" in r.stderr
        # A client that does not trust the CA gives up.
        r = subprocess.run([LIVECLONE, "clone", f"nbds://localhost:{port}/disk",
                            str(tmp_path / "untrusted.img")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
        assert proc.poll() is None  # bad clients cost only their own connections
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def test_bad_tls_directory(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 1 << 20)
    r = subprocess.run([LIVECLONE, "serve", str(src), str(tmp_path / "c.img"),
                        "--tls-certificates", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "server-cert.pem is missing" in r.stderr
