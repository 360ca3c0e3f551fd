"""Read-only sources behind one interface; ``open_source`` picks one from the argument.

=====================================  ===============================================
SOURCE                                 implementation
=====================================  ===============================================
``http://…``, ``https://…``            ``http.HttpSource`` (range requests, urllib3)
``s3://bucket/key``                    ``s3.S3Source`` (boto3, the ``s3`` extra)
``nbd://``, ``nbd+unix://``, ``nbds``  ``nbd.NbdSource`` (our NBD client)
a path to qcow2/vmdk/vhdx/vdi/vpc…     ``image.ImageSource`` (a qemu-nbd child)
a path to a raw image or a device      ``local.LocalFileSource``
=====================================  ===============================================

Each module is imported only when its scheme is used; boto3 is an optional extra
(``pip install 'liveclone[s3]'``), and without it an ``s3://`` source is refused with
``MissingDependencyError`` instead of an ImportError.
"""

from __future__ import annotations

import os

from liveclone.errors import SourceError
from liveclone.sources.base import Extent, Source

_NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp")


def open_source(spec: str) -> Source:
    """Open the source named by ``spec``: a URL by its scheme, a path by its format."""
    scheme = ""
    if "://" in spec:
        from urllib.parse import urlsplit  # only for URLs: it imports ipaddress

        scheme = urlsplit(spec).scheme.lower()
    if scheme in ("http", "https"):
        from liveclone.sources.http import HttpSource

        return HttpSource(spec)
    if scheme == "s3":
        from liveclone.sources.s3 import S3Source

        return S3Source(spec)
    if scheme in _NBD_SCHEMES:
        from liveclone.sources.nbd import NbdSource

        return NbdSource.from_uri(spec)
    if scheme:
        raise SourceError(
            f"source {spec!r} has the unknown scheme {scheme}://; give a local path or a "
            "URL starting with http://, https://, s3://, nbd://, nbd+unix:// or nbds://"
        )
    from liveclone.sources.local import LocalFileSource, is_plain_raw

    if not os.path.isfile(spec) or is_plain_raw(spec):
        # Missing, a directory, a device (the local file source reports the first two
        # well), or no image format's signature: raw, read in this process.
        return LocalFileSource(spec)
    from liveclone.sources.image import open_image

    return open_image(spec)


__all__ = ["Extent", "Source", "open_source"]
