"""An image stored as an S3 object, read with ranged GETs through boto3.

Endpoint, region and credentials come the standard AWS way: the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``...),
``~/.aws/config`` and ``~/.aws/credentials``, or an instance role. One boto3
client (thread-safe) with a connection pool serves every thread. Every read
carries ``If-Match: <ETag>``, so an object replaced mid-copy is refused rather
than mixed in; botocore's own retries are off, ours (``retry.py``) apply.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from liveclone.errors import (
    MissingDependencyError,
    SourceChangedError,
    SourceError,
    SourceUnreachableError,
)
from liveclone.sources.retry import RemoteSource, Retrier, RetryPolicy, TransientError

S3_INSTALL = "pip install 'liveclone[s3]'"
POOL_SIZE = 16
OPEN_POLICY = RetryPolicy(tries=3, budget=3.0)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "RequestTimeTooSkewed", "Throttling", "ThrottlingException",
                    "500", "502", "503", "504"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                     "ExpiredToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed"}


class S3Source(RemoteSource):
    """A read-only image at ``s3://bucket/key``."""

    def __init__(self, uri: str, policy: RetryPolicy | None = None) -> None:
        try:
            import boto3
            import botocore.config
        except ModuleNotFoundError as e:
            # boto3 is an extra (it is large): say which, not a traceback.
            what = ("which is not installed" if e.name == "boto3"
                    else f"and {e.name} is missing")
            raise MissingDependencyError(
                f"s3:// sources need boto3, {what}: {S3_INSTALL}") from None
        self.spec = uri
        parts = urlsplit(uri)
        self.bucket, self.key = parts.netloc, parts.path.lstrip("/")
        if not self.bucket or not self.key:
            raise SourceError(f"S3 source {uri!r} must look like s3://BUCKET/KEY")
        config = botocore.config.Config(
            max_pool_connections=POOL_SIZE, connect_timeout=10, read_timeout=60,
            retries={"total_max_attempts": 1},  # retries are ours, with a visible state
        )
        try:
            self._client = boto3.session.Session().client("s3", config=config)
        except Exception as e:  # noqa: BLE001 - botocore raises many kinds on bad config
            raise SourceError(
                f"cannot set up S3 access for {uri}: {e}; check AWS_REGION, "
                "AWS_ENDPOINT_URL and ~/.aws/config"
            ) from None
        self.retrier = Retrier(f"S3 source {uri}", policy)
        try:
            self.size, self._etag, self._last_modified = self.retrier.call(
                self._probe, "opening", policy=OPEN_POLICY)
        except OSError as e:
            raise SourceUnreachableError(
                f"cannot reach S3 source {uri} at {self._client.meta.endpoint_url}: "
                f"{e.__cause__ or e}. Check AWS_ENDPOINT_URL / AWS_REGION and the network"
            ) from None

    # -- requests ----------------------------------------------------------------

    def _request(self, **kwargs: Any) -> dict[str, Any]:
        """get_object with our error policy: transient → TransientError, else SourceError."""
        import botocore.exceptions as bce

        try:
            return self._client.get_object(  # type: ignore[no-any-return]
                Bucket=self.bucket, Key=self.key, **kwargs)
        except bce.NoCredentialsError:
            raise SourceError(
                f"no AWS credentials found for S3 source {self.spec}: set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or configure "
                "~/.aws/credentials"
            ) from None
        except bce.ClientError as e:
            raise self._client_error(e) from None
        except (bce.EndpointConnectionError, bce.ConnectionClosedError,
                bce.ReadTimeoutError, bce.ConnectTimeoutError, bce.ResponseStreamingError,
                bce.IncompleteReadError) as e:
            raise TransientError(str(e)) from None
        except bce.BotoCoreError as e:
            raise SourceError(f"S3 source {self.spec}: {e}") from None

    def _client_error(self, e: Any) -> Exception:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        text = f"{code}: {err.get('Message', '')}".rstrip(": ")
        if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return TransientError(text)
        if code in _CREDENTIAL_CODES:
            return SourceError(
                f"S3 rejected the credentials for {self.spec} ({text}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile in use"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return SourceError(
                f"access to S3 source {self.spec} is denied ({text}): give these "
                "credentials s3:GetObject on the object, or use credentials that have it"
            )
        if code == "NoSuchBucket":
            return SourceError(f"S3 bucket {self.bucket!r} does not exist: check the URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return SourceError(
                f"S3 object {self.key!r} does not exist in bucket {self.bucket!r}: "
                "check the key"
            )
        if code in ("PreconditionFailed", "412"):
            return SourceChangedError(
                f"S3 source {self.spec} changed while being cloned (its ETag is no longer "
                f"{self._etag}); restore the original object, or delete the clone and "
                "start again"
            )
        return SourceError(f"S3 source {self.spec}: {text}")

    def _probe(self) -> tuple[int, str | None, str | None]:
        """Read byte 0: proves access and gives size, ETag and Last-Modified in one call."""
        try:
            r = self._request(Range="bytes=0-0")
        except SourceError as e:
            if "InvalidRange" not in e.message:
                raise
            r = self._client.head_object(Bucket=self.bucket, Key=self.key)  # empty object
            return 0, r.get("ETag"), _iso(r.get("LastModified"))
        body = r["Body"]
        body.read()
        body.close()
        m = _CONTENT_RANGE.match(r.get("ContentRange", ""))
        size = int(m.group(3)) if m else int(r["ContentLength"])
        return size, r.get("ETag"), _iso(r.get("LastModified"))

    def _read_once(self, offset: int, length: int) -> bytes:
        import botocore.exceptions as bce

        extra = {"IfMatch": self._etag} if self._etag else {}
        r = self._request(Range=f"bytes={offset}-{offset + length - 1}", **extra)
        body = r["Body"]
        try:
            data: bytes = body.read()
        except (bce.ResponseStreamingError, bce.IncompleteReadError,
                bce.ReadTimeoutError) as e:
            raise TransientError(f"cut off mid-body: {e}") from None
        finally:
            body.close()
        if len(data) != length:
            raise TransientError(f"asked for {length} bytes at {offset}, got {len(data)}")
        return data

    # -- the Source interface ------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        return {
            "kind": "s3",
            "path": self.spec,
            "size": self.size,
            "etag": self._etag,
            "last_modified": self._last_modified,
        }

    def close(self) -> None:
        self._client.close()


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None
