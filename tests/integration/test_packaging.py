"""The package as a user gets it: a wheel and an sdist built from this tree, the
wheel installed into a fresh venv without extras, and the commands run from there.

On this machine libfuse2 is installed beside libfuse3 (``install-system-deps.sh``),
as on most Debian and Ubuntu hosts: plain mfusepy binds libfuse2 there, and
``liveclone mount`` must still work, bound to libfuse3.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image
from tests.integration.servers import Nginx, stop

S3_LINE = "pip install 'liveclone[s3]'"


def _env() -> dict[str, str]:
    """The environment for the fresh venv's programs: nothing that would let them
    see this checkout or the development venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "FUSE_LIBRARY_PATH",
                        "FUSE_LIBRARY_NAME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(*cmd: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, sdist), built by ``python -m build`` from a copy of this tree's package
    files (the sdist first, the wheel from the unpacked sdist)."""
    base = tmp_path_factory.mktemp("dist")
    tree = base / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"))
    out = base / "out"
    r = _run(sys.executable, "-m", "build", "--outdir", out, tree, cwd=base)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def venv(dist: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with only the wheel and its ordinary
    dependencies installed: no extras."""
    base = tmp_path_factory.mktemp("venv")
    v = base / "v"
    r = _run(sys.executable, "-m", "venv", v, cwd=base)
    assert r.returncode == 0, r.stderr
    r = _run(v / "bin" / "python", "-m", "pip", "install", "-q", dist[0], cwd=base)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return v


def test_wheel_and_sdist_hold_the_package_and_core_dependencies(
        dist: tuple[Path, Path]) -> None:
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
        entry_points = z.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    ours = {p.relative_to(ROOT / "src").as_posix()
            for p in (ROOT / "src" / "liveclone").rglob("*.py")}
    assert ours <= names, sorted(ours - names)
    assert "liveclone/fuse/libfuse.py" in names
    # The compiled read lane, built from the C source the sdist carries.
    assert any(n.startswith("liveclone/nbd/_lane.") and n.endswith(".so") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert "liveclone = liveclone.cli.main:main" in entry_points
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]
    unconditional = {r.split(";")[0].split(">")[0].split("=")[0].strip()
                     for r in requires if ";" not in r}
    assert {"click", "rich", "mfusepy", "urllib3"} <= unconditional
    assert "boto3" not in unconditional and "requests" not in unconditional
    assert any(r.startswith("boto3") and 'extra == "s3"' in r for r in requires), requires
    assert "Provides-Extra: s3" in meta.splitlines()

    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {"pyproject.toml", "setup.py", "README.md", "src/liveclone/fuse/libfuse.py",
            "src/liveclone/cli/main.py", "src/liveclone/nbd/lane.c",
            "src/liveclone/nbd/lane_build.py"} <= members


def test_fresh_venv_has_no_extras_and_runs_its_own_copy(venv: Path) -> None:
    r = _run(venv / "bin" / "python", "-c",
             "import liveclone, mfusepy, urllib3, uvloop; print(liveclone.__file__)\n"
             "from liveclone.nbd import lane; assert lane.available(), 'no read lane'",
             cwd=venv)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(venv)
    r = _run(venv / "bin" / "python", "-c", "import boto3", cwd=venv)
    assert r.returncode == 1 and "No module named 'boto3'" in r.stderr
    r = _run(venv / "bin" / "liveclone", "--version", cwd=venv)
    assert r.returncode == 0 and "liveclone" in r.stdout


def test_mount_binds_libfuse3_with_libfuse2_installed(venv: Path, tmp_path: Path) -> None:
    # The point of the test: libfuse2 is there, and plain mfusepy takes it.
    libfuse2, libfuse3 = ctypes.util.find_library("fuse"), ctypes.util.find_library("fuse3")
    assert libfuse2 and libfuse2.startswith("libfuse.so.2"), libfuse2
    assert libfuse3 and libfuse3.startswith("libfuse3.so.3"), libfuse3
    r = _run(venv / "bin" / "python", "-c",
             "import mfusepy; print(mfusepy.fuse_version_major, mfusepy._libfuse_path)",
             cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split()[0] == "2", r.stdout + r.stderr

    src, clone, mnt = tmp_path / "src.img", tmp_path / "c.img", tmp_path / "mnt"
    mnt.mkdir()
    data = make_image(src, 4 << 20, seed=3)
    proc = subprocess.Popen(
        [str(venv / "bin" / "liveclone"), "mount", str(src), str(clone), str(mnt),
         "--rate", "1M"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().strip()
        if line != str(mnt / "c.img"):  # it failed: say how
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"mount printed {line!r}, exit {proc.returncode}: {err}")
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libfuse3.so.3" in maps and "libfuse.so.2" not in maps
        with open(line, "rb") as f:
            assert f.read() == data  # mostly not copied yet at 1M/s: read via the source
        patch = b"written through the mount from a wheel install" * 100
        fd = os.open(line, os.O_WRONLY)
        try:
            assert os.pwrite(fd, patch, 12345) == len(patch)
            os.fsync(fd)
        finally:
            os.close(fd)
        expected = data[:12345] + patch + data[12345 + len(patch):]
        assert Path(line).read_bytes() == expected
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            stop(proc)
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert not os.path.ismount(mnt)
    # The same command resumes and finishes: the clone holds source + write.
    r = _run(venv / "bin" / "liveclone", "clone", src, clone, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == expected


def test_http_clone_from_fresh_venv(venv: Path, tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    data = make_image(root / "disk.img", 8 << 20, seed=5)
    server = Nginx(root, tmp_path / "nginx").start()
    try:
        clone = tmp_path / "c.img"
        r = _run(venv / "bin" / "liveclone", "clone", server.url("disk.img"), clone,
                 cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert clone.read_bytes() == data
    finally:
        server.stop()


def test_s3_without_boto3_is_one_line_naming_the_extra(venv: Path, tmp_path: Path) -> None:
    clone = tmp_path / "c.img"
    r = _run(venv / "bin" / "liveclone", "clone", "s3://bucket/disk.img", clone,
             cwd=tmp_path)
    assert r.returncode == 11, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("liveclone: error: s3:// sources need boto3")
    assert lines[0].endswith(S3_LINE)
    assert not clone.exists()


def test_missing_libfuse3_is_one_line_naming_the_debian_package(
        venv: Path, tmp_path: Path) -> None:
    """A host without libfuse3 (simulated: dlopen refuses it, find_library finds
    nothing), but with libfuse2: the mount is refused before anything is created."""
    src, clone, mnt = tmp_path / "src.img", tmp_path / "c.img", tmp_path / "mnt"
    mnt.mkdir()
    make_image(src, 1 << 20)
    program = (
        "import ctypes, ctypes.util, sys\n"
        "real_cdll, real_find = ctypes.CDLL.__init__, ctypes.util.find_library\n"
        "def cdll(self, name, *a, **k):\n"
        "    if name and 'fuse3' in str(name): raise OSError(name + ': no such file')\n"
        "    real_cdll(self, name, *a, **k)\n"
        "ctypes.CDLL.__init__ = cdll\n"
        "ctypes.util.find_library = lambda n: None if n == 'fuse3' else real_find(n)\n"
        "from liveclone.cli.main import main\n"
        f"sys.argv = ['liveclone', 'mount', {str(src)!r}, {str(clone)!r}, {str(mnt)!r}]\n"
        "main()\n"
    )
    r = _run(venv / "bin" / "python", "-c", program, cwd=tmp_path)
    assert r.returncode == 11, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "libfuse3" in lines[0] and "apt-get install fuse3" in lines[0]
    assert "libfuse3-3" in lines[0]
    assert not clone.exists()
