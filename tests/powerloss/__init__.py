"""Power-loss simulation for crash tests: a FUSE file system (``plfs``) whose file
data only becomes durable on fsync/fdatasync, and a ``cut`` that loses the rest,
page by page. See ``plfs.py``.

Use from a test::

    from tests.powerloss import powerloss_mount

    with powerloss_mount(tmp_path, seed=1) as fs:
        ...  # run a workload on fs.mountpoint, kill -9 it
        fs.cut(p=0.5)
        ...  # check what fs.mountpoint shows
"""

from .plfs import CTL_NAME, PAGE, PLFS, powerloss_mount

__all__ = ["CTL_NAME", "PAGE", "PLFS", "powerloss_mount"]
