"""Cloning from S3: moto's standalone server on loopback, with IAM auth enforced."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LIVECLONE, make_image
from tests.integration.servers import TcpProxy, free_port, moto_server, stop, wait_status

SIZE = 16 << 20
BUCKET = "images"
# moto answers this many requests without checking credentials: the setup below.
SETUP_REQUESTS = 5


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A moto S3 holding ``images/disk.img``; yields the environment of a good user."""
    import boto3

    env = {
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}) as endpoint:
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="cloner")
        key = iam.create_access_key(UserName="cloner")["AccessKey"]
        iam.put_user_policy(UserName="cloner", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        client = boto3.client("s3", **admin)
        client.create_bucket(Bucket=BUCKET)
        data = make_image(tmp_path / "disk.img", SIZE)
        client.put_object(Bucket=BUCKET, Key="dir/disk.img", Body=data)
        client.close()
        iam.close()
        yield {"env": {**os.environ, **env, "AWS_ENDPOINT_URL": endpoint,
                       "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                       "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]},
               "data": data, "endpoint": endpoint}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LIVECLONE, *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_clone_from_s3(tmp_path: Path, s3: dict[str, Any]) -> None:
    clone = tmp_path / "c.img"
    r = run(s3["env"], "clone", f"s3://{BUCKET}/dir/disk.img", str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == s3["data"]
    st = json.loads(run(s3["env"], "status", "--json", str(clone)).stdout)
    assert st["source"]["kind"] == "s3" and st["source"]["size"] == SIZE
    assert st["source"]["etag"]
    # Resuming a complete clone with the same, unchanged object is fine.
    r = run(s3["env"], "clone", f"s3://{BUCKET}/dir/disk.img", str(clone))
    assert r.returncode == 0, r.stderr
    assert clone.read_bytes() == s3["data"]


def test_bad_credentials(tmp_path: Path, s3: dict[str, Any]) -> None:
    env = {**s3["env"], "AWS_SECRET_ACCESS_KEY": "wrong"}
    r = run(env, "clone", f"s3://{BUCKET}/dir/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3, r.stderr
    assert "rejected the credentials" in r.stderr and "AWS_SECRET_ACCESS_KEY" in r.stderr
    env = {**s3["env"], "AWS_ACCESS_KEY_ID": "AKIANOBODY"}
    r = run(env, "clone", f"s3://{BUCKET}/dir/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "rejected the credentials" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_no_credentials(tmp_path: Path, s3: dict[str, Any]) -> None:
    env = {k: v for k, v in s3["env"].items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    r = run(env, "clone", f"s3://{BUCKET}/dir/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "no AWS credentials found" in r.stderr


def test_missing_key_and_bucket(tmp_path: Path, s3: dict[str, Any]) -> None:
    r = run(s3["env"], "clone", f"s3://{BUCKET}/nope.img", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "does not exist in bucket" in r.stderr
    r = run(s3["env"], "clone", "s3://no-such-bucket/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "bucket 'no-such-bucket' does not exist" in r.stderr
    r = run(s3["env"], "clone", "s3://just-a-bucket", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "s3://BUCKET/KEY" in r.stderr
    assert not (tmp_path / "c.img").exists()


def test_unreachable_endpoint(tmp_path: Path, s3: dict[str, Any]) -> None:
    env = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    r = run(env, "clone", f"s3://{BUCKET}/dir/disk.img", str(tmp_path / "c.img"))
    assert r.returncode == 3 and "cannot reach S3 source" in r.stderr
    assert "AWS_ENDPOINT_URL" in r.stderr


def test_copy_survives_an_s3_outage(tmp_path: Path, s3: dict[str, Any]) -> None:
    """The network to S3 goes down mid-copy (connections cut, then refused) and comes
    back: the copy retries, says so in status, and finishes byte for byte."""
    port = int(s3["endpoint"].rsplit(":", 1)[1])
    proxy = TcpProxy(port).up()
    env = {**s3["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}",
           "LIVECLONE_RETRY_BUDGET": "60"}
    clone = tmp_path / "c.img"
    proc = subprocess.Popen([LIVECLONE, "clone", f"s3://{BUCKET}/dir/disk.img", str(clone),
                             "--rate", "4M"], stderr=subprocess.DEVNULL, env=env)
    try:
        wait_status(clone, lambda s: s["regions_present"] > 0, proc)
        proxy.down()
        st = wait_status(clone, lambda s: bool(s["source_status"].get("retrying")), proc)
        assert "retrying" in st["last_error"]
        stalled = st["regions_present"]
        time.sleep(2)  # well inside the retry budget: still running, still retrying
        st = wait_status(clone, lambda s: True, proc)
        assert st["source_status"].get("retrying")
        # At most the batches already received finished during the outage.
        assert st["regions_present"] <= stalled + 64 < st["regions_total"]
        proxy.up()
        assert proc.wait(120) == 0
    finally:
        stop(proc)
        proxy.down()
    assert clone.read_bytes() == s3["data"]
    st = json.loads(run(s3["env"], "status", "--json", str(clone)).stdout)
    assert st["phase"] == "complete"
