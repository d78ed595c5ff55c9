"""S3 on a cluster, driven by boto3 through every node at once: what one node acknowledges, every
node reads at once; racing conditional writes through different nodes are decided once; a
multipart upload may be spread over nodes; listings agree everywhere. With `after-kill`, the
same checks run on the nodes still up after one was killed, and every object the first run
wrote must still read back whole.

Environment: S3_ENDPOINTS (comma-separated, the live nodes), S3_KEY_ID, S3_SECRET, S3_READER_ID
and S3_READER_SECRET (a read-only key), S3_GRANTED_ID and S3_GRANTED_SECRET (a read-write key
granted bucket `spread` and, read-only, bucket `shared`), S3_FIRST_NODES (how many nodes the
first run wrote through). Argument: `first` or `after-kill`.
Exits non-zero on the first failed check, naming it.
"""

import concurrent.futures
import hashlib
import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ENDPOINTS = os.environ["S3_ENDPOINTS"].split(",")
PHASE = sys.argv[1]
BUCKET = "spread"


def client(endpoint, key_id=os.environ["S3_KEY_ID"], secret=os.environ["S3_SECRET"], attempts=10):
    # Retries as the SDKs' standard mode does: a write whose coordinator was just killed is
    # refused (503) until the cluster sees it gone.
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        # s3v4: boto3 presigns for a custom endpoint with Signature V2 otherwise (docs/s3.md).
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                      retries={"max_attempts": attempts, "mode": "standard"}),
    )


nodes = [client(e) for e in ENDPOINTS]


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED: {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok: {name}", flush=True)


def code_of(fn):
    try:
        fn()
        return "OK"
    except ClientError as e:
        return e.response["Error"]["Code"]


def body(node, key):
    return node.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def data_for(key):
    return hashlib.sha256(key.encode()).digest() * 40


def read_after_write(tag):
    for i, writer in enumerate(nodes):
        for n in range(10):
            key = f"{tag}/w{i}-{n}"
            writer.put_object(Bucket=BUCKET, Key=key, Body=data_for(key))
            for j, reader in enumerate(nodes):
                check(f"{key} written through node {i} reads through node {j}", body(reader, key) == data_for(key))
    # An overwrite through one node and a delete through another: seen at once everywhere.
    key = f"{tag}/w0-0"
    nodes[-1].put_object(Bucket=BUCKET, Key=key, Body=b"newer")
    check("an overwrite is seen through every node", all(body(n, key) == b"newer" for n in nodes))
    nodes[0].put_object(Bucket=BUCKET, Key=key, Body=data_for(key))
    nodes[0].delete_object(Bucket=BUCKET, Key=f"{tag}/gone")
    nodes[0].put_object(Bucket=BUCKET, Key=f"{tag}/gone", Body=b"x")
    nodes[-1].delete_object(Bucket=BUCKET, Key=f"{tag}/gone")
    check("a delete is seen through every node", all(code_of(lambda n=n: body(n, f"{tag}/gone")) == "NoSuchKey" for n in nodes))
    # DeleteObjects through one node deletes each key at its own coordinator.
    batch = [f"{tag}/batch-{k}" for k in range(12)]
    for key in batch:
        nodes[k % len(nodes) if (k := batch.index(key)) else 0].put_object(Bucket=BUCKET, Key=key, Body=b"b")
    answer = nodes[-1].delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in batch]})
    check("DeleteObjects through one node deletes keys of every coordinator", not answer.get("Errors") and len(answer["Deleted"]) == len(batch), answer)
    check("and every node sees them gone", all(code_of(lambda n=n, k=k: body(n, k)) == "NoSuchKey" for n in nodes for k in batch))


def racing_conditional_writes(tag):
    # Two writers through two nodes, both "only if absent": one wins, the other gets 412, and
    # what is stored is the winner's.
    for round in range(20):
        key = f"{tag}/race-{round}"
        a, b = nodes[round % len(nodes)], nodes[(round + 1) % len(nodes)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(
                lambda pair: code_of(lambda: pair[0].put_object(Bucket=BUCKET, Key=key, Body=pair[1], IfNoneMatch="*")),
                [(a, b"from-a"), (b, b"from-b")],
            ))
        check(f"{key}: exactly one conditional write wins", sorted(outcomes) == ["OK", "PreconditionFailed"], outcomes)
        winner = b"from-a" if outcomes[0] == "OK" else b"from-b"
        check(f"{key}: the winner's bytes are stored", all(body(n, key) == winner for n in nodes))


def spread_multipart(tag):
    key = f"{tag}/multipart"
    upload = nodes[0].create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    parts, expected = [], b""
    for number in range(1, 4):
        data = bytes([number]) * (5 << 20 if number < 3 else 1000)
        uploader = nodes[number % len(nodes)]
        etag = uploader.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=number, Body=data)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
        expected += data
    listed = nodes[-1].list_parts(Bucket=BUCKET, Key=key, UploadId=upload)["Parts"]
    check("parts uploaded through different nodes all list", [p["PartNumber"] for p in listed] == [1, 2, 3])
    nodes[-1].complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    check("the completed object reads through every node", all(body(n, key) == expected for n in nodes))
    # An abort through another node, after the completion, takes nothing from the object.
    check("aborting a completed upload is NoSuchUpload or done", code_of(lambda: nodes[0].abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload)) in ("OK", "NoSuchUpload"))
    check("the object survives the abort", body(nodes[1 % len(nodes)], key) == expected)


def listings_agree(tag):
    listings = []
    for node in nodes:
        keys = []
        for page in node.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{tag}/", PaginationConfig={"PageSize": 7}):
            keys += [o["Key"] for o in page.get("Contents", [])]
        listings.append(keys)
    check("every node lists the same keys, in byte order", all(l == listings[0] for l in listings) and listings[0] == sorted(listings[0], key=lambda k: k.encode()), listings)
    check("the listing holds what was written", f"{tag}/w0-0" in listings[0] and f"{tag}/gone" not in listings[0])


def scopes():
    reader = client(ENDPOINTS[-1], os.environ["S3_READER_ID"], os.environ["S3_READER_SECRET"], attempts=1)
    check("a read-only key reads", reader.get_object(Bucket=BUCKET, Key="first/w0-1")["Body"].read() == data_for("first/w0-1"))
    check("a read-only key cannot write, whichever node coordinates the key", all(
        code_of(lambda k=k: reader.put_object(Bucket=BUCKET, Key=f"denied-{k}", Body=b"x")) == "AccessDenied" for k in range(12)))
    bad = client(ENDPOINTS[-1], os.environ["S3_KEY_ID"], "not-the-secret", attempts=1)
    check("a wrong secret is SignatureDoesNotMatch", code_of(lambda: bad.put_object(Bucket=BUCKET, Key="x", Body=b"x")) == "SignatureDoesNotMatch")


def bucket_grants():
    admin = nodes[0]
    for bucket in ["shared", "private"]:
        admin.create_bucket(Bucket=bucket)
        admin.put_object(Bucket=bucket, Key="doc", Body=bucket.encode())
    granted = [client(e, os.environ["S3_GRANTED_ID"], os.environ["S3_GRANTED_SECRET"], attempts=1) for e in ENDPOINTS]
    g = granted[-1]
    names = sorted(b["Name"] for b in g.list_buckets()["Buckets"])
    check("a key limited to buckets lists only those", names == ["shared", "spread"], names)
    check("it writes and reads where it is granted both, through every node", all(
        code_of(lambda n=n, i=i: n.put_object(Bucket=BUCKET, Key=f"granted/{i}", Body=b"g")) == "OK"
        and n.get_object(Bucket=BUCKET, Key=f"granted/{i}")["Body"].read() == b"g" for i, n in enumerate(granted)))
    check("it reads a bucket granted read", g.get_object(Bucket="shared", Key="doc")["Body"].read() == b"shared")
    check("it cannot write a bucket granted read, whichever node coordinates the key", all(
        code_of(lambda k=k: g.put_object(Bucket="shared", Key=f"w{k}", Body=b"x")) == "AccessDenied" for k in range(12)))
    for what, op in [
        ("read", lambda: g.get_object(Bucket="private", Key="doc")),
        ("head", lambda: g.head_object(Bucket="private", Key="doc")),
        ("list", lambda: g.list_objects_v2(Bucket="private")),
        ("write", lambda: g.put_object(Bucket="private", Key="x", Body=b"x")),
        ("delete", lambda: g.delete_object(Bucket="private", Key="doc")),
        ("locate", lambda: g.get_bucket_location(Bucket="private")),
    ]:
        code = code_of(op)
        # HEAD answers carry no body: botocore names the code by the status.
        check(f"it cannot {what} a bucket it is not granted", code in ("AccessDenied", "403"), code)
    check("no delete scope, no delete in its own bucket", code_of(lambda: g.delete_object(Bucket=BUCKET, Key="granted/0")) == "AccessDenied")
    batch = code_of(lambda: g.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": "granted/0"}]}))
    check("nor a batch delete", batch == "AccessDenied", batch)
    check("it cannot create a bucket", code_of(lambda: g.create_bucket(Bucket="granted-new")) == "AccessDenied")
    check("nor delete one", code_of(lambda: g.delete_bucket(Bucket="shared")) == "AccessDenied")
    check("a copy from a bucket it may read is allowed",
          code_of(lambda: g.copy_object(Bucket=BUCKET, Key="granted/copy", CopySource={"Bucket": "shared", "Key": "doc"})) == "OK"
          and g.get_object(Bucket=BUCKET, Key="granted/copy")["Body"].read() == b"shared")
    copy = code_of(lambda: g.copy_object(Bucket=BUCKET, Key="granted/stolen", CopySource={"Bucket": "private", "Key": "doc"}))
    check("a copy from a bucket it may not read is refused", copy == "AccessDenied", copy)
    upload = g.create_multipart_upload(Bucket=BUCKET, Key="granted/parts")["UploadId"]
    part = code_of(lambda: g.upload_part_copy(Bucket=BUCKET, Key="granted/parts", UploadId=upload, PartNumber=1,
                                              CopySource={"Bucket": "private", "Key": "doc"}))
    check("a part copied from a bucket it may not read is refused", part == "AccessDenied", part)
    g.abort_multipart_upload(Bucket=BUCKET, Key="granted/parts", UploadId=upload)
    import urllib.request, urllib.error
    url = g.generate_presigned_url("get_object", Params={"Bucket": "private", "Key": "doc"}, ExpiresIn=60)
    try:
        urllib.request.urlopen(url)
        status = 200
    except urllib.error.HTTPError as e:
        status = e.code
    check("its presigned URL to a bucket it is not granted is refused", status == 403, status)
    own = g.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "granted/0"}, ExpiresIn=60)
    check("its presigned URL to its own bucket works", urllib.request.urlopen(own).read() == b"g")


def main():
    if PHASE == "first":
        nodes[0].create_bucket(Bucket=BUCKET)
        check("a bucket made through one node is there through all", all(code_of(lambda n=n: n.head_bucket(Bucket=BUCKET)) == "OK" for n in nodes))
        tag = "first"
    else:
        for n in range(10):
            for i in range(int(os.environ["S3_FIRST_NODES"])):
                key = f"first/w{i}-{n}"
                check(f"{key} survived the kill", all(body(node, key) == data_for(key) for node in nodes))
        tag = "after"
    read_after_write(tag)
    racing_conditional_writes(tag)
    spread_multipart(tag)
    listings_agree(tag)
    if PHASE == "first":
        scopes()
        bucket_grants()
    print("ALL PASSED", flush=True)


main()
