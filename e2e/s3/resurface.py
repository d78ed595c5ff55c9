"""Phases of `a_deleted_object_stays_deleted_when_a_failed_older_write_comes_back`
(e2e/tests/cluster.rs), driven by boto3 through the nodes of S3_ENDPOINTS (comma-separated).

- `setup`: bucket `bkt`, object `k` ("first"); `gone` written and deleted.
- `overwrite-delete`: `k` overwritten ("second"), then deleted; `gone` deleted again; all must be
  acknowledged.
- `check`: `k` and `gone` are NoSuchKey on every node and no listing shows them; `other` still
  reads.
- `full` (`an_s3_delete_in_a_full_partition_goes_through`): bucket `full` filled with 60 KB (inline)
  objects until InsufficientStorage; then deleting one is acknowledged and it is gone.

Environment: S3_ENDPOINTS, S3_KEY_ID, S3_SECRET. Exits non-zero on the first failed check.
"""

import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def client(endpoint):
    # Retries as the SDKs' standard mode does: a write whose coordinator is down is refused
    # (503) until the cluster sees it gone.
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=os.environ["S3_KEY_ID"],
        aws_secret_access_key=os.environ["S3_SECRET"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 10, "mode": "standard"}),
    )


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED: {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok: {name}", flush=True)


nodes = [client(e) for e in os.environ["S3_ENDPOINTS"].split(",")]
phase = sys.argv[1]
if phase == "setup":
    nodes[0].create_bucket(Bucket="bkt")
    nodes[0].put_object(Bucket="bkt", Key="k", Body=b"first")
    nodes[0].put_object(Bucket="bkt", Key="other", Body=b"other")
    nodes[0].put_object(Bucket="bkt", Key="gone", Body=b"gone")
    nodes[0].delete_object(Bucket="bkt", Key="gone")
elif phase == "overwrite-delete":
    nodes[0].put_object(Bucket="bkt", Key="k", Body=b"second")
    check("the overwrite reads back", nodes[0].get_object(Bucket="bkt", Key="k")["Body"].read() == b"second")
    nodes[0].delete_object(Bucket="bkt", Key="k")
    nodes[0].delete_object(Bucket="bkt", Key="gone")
elif phase == "check":
    for i, node in enumerate(nodes):
        for key in ["k", "gone"]:
            try:
                body = node.get_object(Bucket="bkt", Key=key)["Body"].read()
                check(f"node {i}: {key} stays deleted", False, f"it reads {body!r}")
            except ClientError as e:
                check(f"node {i}: {key} stays deleted", e.response["Error"]["Code"] == "NoSuchKey", e.response["Error"])
        check(f"node {i}: other still reads", node.get_object(Bucket="bkt", Key="other")["Body"].read() == b"other")
        keys = [o["Key"] for o in node.list_objects_v2(Bucket="bkt").get("Contents", [])]
        check(f"node {i}: no listing shows it", keys == ["other"], keys)
elif phase == "full":
    nodes[0].create_bucket(Bucket="full")
    stored, refused = [], None
    for i in range(1000):
        try:
            nodes[0].put_object(Bucket="full", Key=f"o{i}", Body=os.urandom(60_000))
            stored.append(f"o{i}")
        except ClientError as e:
            refused = e.response["Error"]["Code"]
            break
    check("the partition fills up: InsufficientStorage", refused == "InsufficientStorage" and len(stored) > 3, (refused, len(stored)))
    for node in nodes:
        node.delete_object(Bucket="full", Key=stored[0])
    for i, node in enumerate(nodes):
        try:
            node.head_object(Bucket="full", Key=stored[0])
            check(f"node {i}: the deleted object is gone", False)
        except ClientError as e:
            check(f"node {i}: the deleted object is gone", e.response["Error"]["Code"] in ("404", "NoSuchKey"), e.response["Error"])
    keys = [o["Key"] for o in nodes[-1].list_objects_v2(Bucket="full").get("Contents", [])]
    check("the listing holds the rest", sorted(keys) == sorted(stored[1:]), len(keys))
else:
    sys.exit(f"unknown phase {phase}")
