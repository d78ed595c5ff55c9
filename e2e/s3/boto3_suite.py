"""Cairn's S3 front driven by boto3, unmodified: each check compares what S3's own client
reports with what the test sent (sizes, bytes, ETags as MD5, checksums as zlib/hashlib compute
them, listings as Python's sorted() orders UTF-8 bytes).

Environment: S3_ENDPOINT, S3_KEY_ID, S3_SECRET, S3_PIECE_BYTES (the node's --s3-piece-size);
S3_LIST_KEYS (10,000), S3_CLUSTER=1 against a cluster.
Exits non-zero on the first failed check, naming it.
"""

import base64
import concurrent.futures
import datetime
import hashlib
import io
import os
import random
import sys
import urllib.error
import urllib.request
import zlib

import boto3
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

ENDPOINT = os.environ["S3_ENDPOINT"]
KEY_ID = os.environ["S3_KEY_ID"]
SECRET = os.environ["S3_SECRET"]
PIECE = int(os.environ["S3_PIECE_BYTES"])
LIST_KEYS = int(os.environ.get("S3_LIST_KEYS", "10000"))
# A cluster's front (S3_CLUSTER=1) differs where docs/s3.md says so.
CLUSTER = os.environ.get("S3_CLUSTER") == "1"


def client(key_id=KEY_ID, secret=SECRET, **config):
    return boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, max_pool_connections=32, **config),
    )


s3 = client()


def error_of(fn):
    try:
        fn()
    except ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
    raise AssertionError("expected an error, the call succeeded")


def check(name, ok, detail=""):
    if not ok:
        print(f"FAILED: {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok: {name}", flush=True)


def body_of(bucket, key, **kw):
    return s3.get_object(Bucket=bucket, Key=key, **kw)["Body"].read()


def buckets():
    s3.create_bucket(Bucket="suite")
    names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    check("a created bucket is listed", "suite" in names, names)
    s3.head_bucket(Bucket="suite")
    check("a bucket's location is the region", s3.get_bucket_location(Bucket="suite")["LocationConstraint"] in (None, "us-east-1"))
    check("a missing bucket is NoSuchBucket", error_of(lambda: s3.list_objects_v2(Bucket="nope-bucket")) == ("NoSuchBucket", 404))
    check("an invalid bucket name is refused", error_of(lambda: s3.create_bucket(Bucket="Bad_Name"))[1] == 400)
    check("HEAD of a missing bucket is 404", error_of(lambda: s3.head_bucket(Bucket="nope-bucket"))[1] == 404)


def sizes():
    # Every boundary of a piece (a blob) and of a verified chunk (1 MiB) inside a piece.
    boundaries = {0, 1, PIECE - 1, PIECE, PIECE + 1, 2 * PIECE + 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * PIECE + 12345}
    rng = random.Random(7)
    for size in sorted(boundaries):
        data = rng.randbytes(size)
        key = f"sizes/{size}"
        put = s3.put_object(Bucket="suite", Key=key, Body=data)
        check(f"PUT {size} B answers the MD5 as ETag", put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"', put["ETag"])
        got = body_of("suite", key)
        check(f"GET {size} B returns the bytes", got == data, f"{len(got)} bytes back")
        head = s3.head_object(Bucket="suite", Key=key)
        check(f"HEAD {size} B says its length", head["ContentLength"] == size)
        for _ in range(6 if size else 0):
            a = rng.randrange(size)
            b = rng.randrange(a, size)
            part = s3.get_object(Bucket="suite", Key=key, Range=f"bytes={a}-{b}")
            check(f"range {a}-{b} of {size} B", part["Body"].read() == data[a : b + 1] and part["ContentRange"] == f"bytes {a}-{b}/{size}")
        if size:
            check(f"suffix range of {size} B", body_of("suite", key, Range="bytes=-7") == data[-7:])
            check(f"an open-ended huge range of {size} B is the whole object", body_of("suite", key, Range="bytes=0-18446744073709551615") == data)
            check(f"a range past {size} B is InvalidRange", error_of(lambda: s3.get_object(Bucket="suite", Key=key, Range=f"bytes={size}-"))[0] == "InvalidRange")


def metadata_and_checksums():
    data = b"hello, metadata"
    s3.put_object(Bucket="suite", Key="meta", Body=data, ContentType="text/plain", Metadata={"color": "blue", "n": "1"}, CacheControl="max-age=60", ContentDisposition="attachment")
    head = s3.head_object(Bucket="suite", Key="meta")
    check("content type round-trips", head["ContentType"] == "text/plain", head["ContentType"])
    check("user metadata round-trips", head["Metadata"] == {"color": "blue", "n": "1"}, head["Metadata"])
    check("stored headers round-trip", head["CacheControl"] == "max-age=60" and head["ContentDisposition"] == "attachment")
    got = s3.get_object(Bucket="suite", Key="meta", ResponseContentType="application/x-override")
    check("response-content-type overrides", got["ContentType"] == "application/x-override")
    for algorithm, expected in [
        ("CRC32", base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()),
        ("SHA1", base64.b64encode(hashlib.sha1(data).digest()).decode()),
        ("SHA256", base64.b64encode(hashlib.sha256(data).digest()).decode()),
    ]:
        put = s3.put_object(Bucket="suite", Key=f"sum-{algorithm}", Body=data, ChecksumAlgorithm=algorithm)
        check(f"PUT with {algorithm} answers it", put.get(f"Checksum{algorithm}") == expected, put)
        head = s3.head_object(Bucket="suite", Key=f"sum-{algorithm}", ChecksumMode="ENABLED")
        check(f"HEAD returns the stored {algorithm}", head.get(f"Checksum{algorithm}") == expected, head)
        check(f"GET returns the bytes under {algorithm}", s3.get_object(Bucket="suite", Key=f"sum-{algorithm}", ChecksumMode="ENABLED")["Body"].read() == data)
    wrong = base64.b64encode(b"\0\0\0\0").decode()
    check("a wrong CRC32 is BadDigest", error_of(lambda: s3.put_object(Bucket="suite", Key="bad-sum", Body=data, ChecksumCRC32=wrong))[0] == "BadDigest")
    check("a wrong Content-MD5 is BadDigest", error_of(lambda: s3.put_object(Bucket="suite", Key="bad-md5", Body=data, ContentMD5=base64.b64encode(hashlib.md5(b"x").digest()).decode()))[0] == "BadDigest")
    check("a refused PUT stores nothing", error_of(lambda: s3.head_object(Bucket="suite", Key="bad-md5"))[1] == 404)


def conditionals():
    s3.put_object(Bucket="suite", Key="cond", Body=b"v1")
    etag = s3.head_object(Bucket="suite", Key="cond")["ETag"]
    check("If-None-Match: * over an object is 412", error_of(lambda: s3.put_object(Bucket="suite", Key="cond", Body=b"v2", IfNoneMatch="*")) == ("PreconditionFailed", 412))
    s3.put_object(Bucket="suite", Key="cond-new", Body=b"first", IfNoneMatch="*")
    check("If-None-Match: * on a new key writes", body_of("suite", "cond-new") == b"first")
    check("If-Match with another ETag is 412", error_of(lambda: s3.put_object(Bucket="suite", Key="cond", Body=b"v2", IfMatch='"0123"'))[1] == 412)
    s3.put_object(Bucket="suite", Key="cond", Body=b"v2", IfMatch=etag)
    check("If-Match with the current ETag writes", body_of("suite", "cond") == b"v2")
    etag = s3.head_object(Bucket="suite", Key="cond")["ETag"]
    check("GET If-None-Match with the ETag is 304", error_of(lambda: s3.get_object(Bucket="suite", Key="cond", IfNoneMatch=etag))[1] == 304)
    check("GET If-Match with another ETag is 412", error_of(lambda: s3.get_object(Bucket="suite", Key="cond", IfMatch='"abc"'))[1] == 412)
    future = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    check("GET If-Modified-Since tomorrow is 304", error_of(lambda: s3.get_object(Bucket="suite", Key="cond", IfModifiedSince=future))[1] == 304)
    check("GET If-Unmodified-Since 2000 is 412", error_of(lambda: s3.get_object(Bucket="suite", Key="cond", IfUnmodifiedSince=past))[1] == 412)
    check("GET If-Modified-Since 2000 serves", body_of("suite", "cond", IfModifiedSince=past) == b"v2")


def deletes_and_copies():
    s3.put_object(Bucket="suite", Key="gone", Body=b"x")
    s3.delete_object(Bucket="suite", Key="gone")
    check("a deleted key is NoSuchKey", error_of(lambda: s3.get_object(Bucket="suite", Key="gone")) == ("NoSuchKey", 404))
    s3.delete_object(Bucket="suite", Key="gone")  # again: 204, as S3
    keys = [f"batch/{i}" for i in range(25)]
    for k in keys:
        s3.put_object(Bucket="suite", Key=k, Body=k.encode())
    result = s3.delete_objects(Bucket="suite", Delete={"Objects": [{"Key": k} for k in keys] + [{"Key": "batch/never"}]})
    check("DeleteObjects reports each key", sorted(d["Key"] for d in result["Deleted"]) == sorted(keys + ["batch/never"]), result.get("Errors"))
    check("DeleteObjects deleted them", s3.list_objects_v2(Bucket="suite", Prefix="batch/")["KeyCount"] == 0)
    s3.put_object(Bucket="suite", Key="src", Body=b"copy me" * 1000, Metadata={"a": "1"}, ContentType="text/x-src")
    s3.copy_object(Bucket="suite", Key="dst", CopySource={"Bucket": "suite", "Key": "src"})
    head = s3.head_object(Bucket="suite", Key="dst")
    check("CopyObject copies bytes and metadata", body_of("suite", "dst") == b"copy me" * 1000 and head["Metadata"] == {"a": "1"} and head["ContentType"] == "text/x-src")
    s3.copy_object(Bucket="suite", Key="dst2", CopySource={"Bucket": "suite", "Key": "src"}, MetadataDirective="REPLACE", Metadata={"b": "2"}, ContentType="text/x-new")
    head = s3.head_object(Bucket="suite", Key="dst2")
    check("CopyObject REPLACE takes the new metadata", head["Metadata"] == {"b": "2"} and head["ContentType"] == "text/x-new")
    s3.delete_object(Bucket="suite", Key="src")
    check("a copy outlives its source", body_of("suite", "dst") == b"copy me" * 1000)
    check("a version id other than null is InvalidArgument", error_of(lambda: s3.get_object(Bucket="suite", Key="dst", VersionId="123"))[0] == "InvalidArgument")
    s3.put_object(Bucket="suite", Key="q?versionId=1", Body=b"QQQ")
    s3.put_object(Bucket="suite", Key="q", Body=b"plain-q")
    s3.copy_object(Bucket="suite", Key="qcopy", CopySource={"Bucket": "suite", "Key": "q?versionId=1"})
    check("a copy source whose key holds ?versionId= is that key", body_of("suite", "qcopy") == b"QQQ")
    check("a copy source's version id other than null is InvalidArgument", error_of(lambda: s3.copy_object(Bucket="suite", Key="qcopy", CopySource={"Bucket": "suite", "Key": "q", "VersionId": "bogus"}))[0] == "InvalidArgument")
    check("copying a missing key is NoSuchKey", error_of(lambda: s3.copy_object(Bucket="suite", Key="x", CopySource={"Bucket": "suite", "Key": "missing"}))[0] == "NoSuchKey")


def odd_keys():
    keys = ["a b+c", "ü/€uro", "with?query&x=1", "x%20y", "trailing/", "dots/../x", "tab\tkey", "~tilde", "semi;colon", "*star", "'quote\"", "k" * 1024]
    for k in keys:
        s3.put_object(Bucket="suite", Key=k, Body=k.encode())
        check(f"key {k[:30]!r} round-trips", body_of("suite", k) == k.encode())
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="suite")["Contents"]]
    for k in keys:
        check(f"key {k[:30]!r} is listed as itself", k in listed)
    check("a 1,025-byte key is KeyTooLongError", error_of(lambda: s3.put_object(Bucket="suite", Key="k" * 1025, Body=b""))[0] == "KeyTooLongError")


def listings():
    s3.create_bucket(Bucket="listing")
    keys = [f"dir{i % 100:02d}/file{i:05d}" for i in range(LIST_KEYS)] + [f"top{i}" for i in range(5)] + ["dir00", "é", "dir07/sub/deep"]

    def put(k):
        s3.put_object(Bucket="listing", Key=k, Body=b"")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(put, keys))
    expected = sorted(keys, key=lambda k: k.encode())
    got = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="listing", PaginationConfig={"PageSize": 1000}):
        got += [o["Key"] for o in page.get("Contents", [])]
    check(f"ListObjectsV2 pages through {len(keys)} keys in byte order", got == expected, f"{len(got)} listed")
    prefixes, tops = [], []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="listing", Delimiter="/", PaginationConfig={"PageSize": 7}):
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        tops += [o["Key"] for o in page.get("Contents", [])]
    check("the delimiter rolls keys up into 100 prefixes", prefixes == [f"dir{i:02d}/" for i in range(100)], prefixes[:5])
    check("and lists the keys above them", tops == sorted([f"top{i}" for i in range(5)] + ["dir00", "é"], key=lambda k: k.encode()), tops)
    under = s3.list_objects_v2(Bucket="listing", Prefix="dir07/", Delimiter="/")
    check("a prefix lists its own keys and sub-prefixes", [p["Prefix"] for p in under["CommonPrefixes"]] == ["dir07/sub/"] and under["KeyCount"] == LIST_KEYS // 100 + 1)
    after = s3.list_objects_v2(Bucket="listing", StartAfter="dir99/", MaxKeys=3)
    check("StartAfter skips what sorts before it", [o["Key"] for o in after["Contents"]] == [k for k in expected if k.encode() > b"dir99/"][:3] and after["IsTruncated"])
    v1 = []
    for page in s3.get_paginator("list_objects").paginate(Bucket="listing", Prefix="dir3", PaginationConfig={"PageSize": 333}):
        v1 += [o["Key"] for o in page.get("Contents", [])]
    check("ListObjects (v1) pages with markers", v1 == [k for k in expected if k.startswith("dir3")], f"{len(v1)} listed")
    zero = s3.list_objects_v2(Bucket="listing", MaxKeys=0)
    check("MaxKeys=0 lists nothing, not truncated", zero.get("KeyCount") == 0 and not zero["IsTruncated"])
    v1_prefixes = []
    for page in s3.get_paginator("list_objects").paginate(Bucket="listing", Delimiter="/", PaginationConfig={"PageSize": 1}):
        v1_prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    check("ListObjects (v1) pages past common prefixes one by one", v1_prefixes == [f"dir{i:02d}/" for i in range(100)], v1_prefixes[:4])
    past = s3.list_objects_v2(Bucket="listing", Delimiter="/", StartAfter="dir05/", MaxKeys=2)
    check("StartAfter a common prefix skips its keys", [p["Prefix"] for p in past["CommonPrefixes"]] == ["dir06/", "dir07/"])
    check("a non-empty bucket is not deleted", error_of(lambda: s3.delete_bucket(Bucket="listing"))[0] == "BucketNotEmpty")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="listing"):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket="listing", Delete={"Objects": objects, "Quiet": True})
    s3.delete_bucket(Bucket="listing")
    check("an emptied bucket is deleted", error_of(lambda: s3.head_bucket(Bucket="listing"))[1] == 404)


def presigned():
    s3.put_object(Bucket="suite", Key="shared", Body=b"presigned bytes")
    # boto3 presigns with Signature Version 2 unless told otherwise: refused, saying so.
    v2 = s3.generate_presigned_url("get_object", Params={"Bucket": "suite", "Key": "shared"}, ExpiresIn=300)
    try:
        urllib.request.urlopen(v2)
        check("a Signature V2 presigned URL is refused", False)
    except urllib.error.HTTPError as e:
        check("a Signature V2 presigned URL is refused, naming SigV4", e.code == 400 and b"AWS4-HMAC-SHA256" in e.read())
    signer = client(signature_version="s3v4")
    url = signer.generate_presigned_url("get_object", Params={"Bucket": "suite", "Key": "shared"}, ExpiresIn=300)
    check("a presigned GET serves without credentials", urllib.request.urlopen(url).read() == b"presigned bytes")
    tampered = url.replace("shared", "sharee")
    try:
        urllib.request.urlopen(tampered)
        check("a tampered presigned URL is refused", False)
    except urllib.error.HTTPError as e:
        check("a tampered presigned URL is refused", e.code == 403, e.code)
    put_url = signer.generate_presigned_url("put_object", Params={"Bucket": "suite", "Key": "uploaded"}, ExpiresIn=300)
    urllib.request.urlopen(urllib.request.Request(put_url, data=b"via presigned put", method="PUT"))
    check("a presigned PUT stores", body_of("suite", "uploaded") == b"via presigned put")
    # Headers the signature does not cover cannot turn the URL into something else (a copy).
    hijack = urllib.request.Request(put_url, data=b"", method="PUT", headers={"x-amz-copy-source": "suite/shared"})
    try:
        urllib.request.urlopen(hijack)
        check("an unsigned x-amz-copy-source on a presigned PUT is refused", False)
    except urllib.error.HTTPError as e:
        check("an unsigned x-amz-copy-source on a presigned PUT is refused", e.code == 403, e.code)
    check("and the key keeps its bytes", body_of("suite", "uploaded") == b"via presigned put")


def credentials():
    wrong = client(secret="x" * 40)
    check("a wrong secret is SignatureDoesNotMatch", error_of(lambda: wrong.list_buckets()) == ("SignatureDoesNotMatch", 403))
    unknown = client(key_id="CKNOSUCHKEY000000000")
    check("an unknown key is InvalidAccessKeyId", error_of(lambda: unknown.list_buckets()) == ("InvalidAccessKeyId", 403))
    anonymous = boto3.client("s3", endpoint_url=ENDPOINT, region_name="us-east-1", config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    check("an anonymous request is AccessDenied", error_of(lambda: anonymous.get_object(Bucket="suite", Key="meta")) == ("AccessDenied", 403))
    other_region = boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET, region_name="eu-west-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    check("a request signed for another region is refused", error_of(lambda: other_region.list_buckets())[0] == "AuthorizationHeaderMalformed")


def overwrites():
    blobs = {i: os.urandom(3 * PIECE // 2 + i) for i in range(16)}

    def write(i):
        s3.put_object(Bucket="suite", Key="contended", Body=blobs[i])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(write, blobs))
    got = body_of("suite", "contended")
    check("concurrent overwrites leave one whole version", got in blobs.values(), len(got))
    listed = [o for o in s3.list_objects_v2(Bucket="suite", Prefix="contended")["Contents"]]
    check("and one listing entry, with that version's ETag", len(listed) == 1 and listed[0]["ETag"] == f'"{hashlib.md5(got).hexdigest()}"')


def read_during_overwrite():
    old = os.urandom(4 * PIECE + 5)
    s3.put_object(Bucket="suite", Key="moving", Body=old)
    body = s3.get_object(Bucket="suite", Key="moving")["Body"]
    head = body.read(1024)
    s3.put_object(Bucket="suite", Key="moving", Body=b"new")
    rest = body.read()
    check("a read answering while its object is overwritten returns the old bytes whole", head + rest == old, len(head + rest))
    check("and the next read the new ones", body_of("suite", "moving") == b"new")


def multipart_etag(parts):
    """S3's ETag of a multipart object: the MD5 of its parts' MD5s, a dash, their number."""
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(joined).hexdigest()}-{len(parts)}"'


def multipart():
    MIB = 1 << 20
    rng = random.Random(11)
    # boto3's managed transfer, as applications use it: 5 MiB parts, the last one short.
    data = rng.randbytes(17 * MIB + 3)
    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=4)
    s3.upload_fileobj(io.BytesIO(data), "suite", "mpu/managed", Config=config, ExtraArgs={"ContentType": "video/x-test", "Metadata": {"m": "1"}})
    head = s3.head_object(Bucket="suite", Key="mpu/managed")
    chunks = [data[i : i + 5 * MIB] for i in range(0, len(data), 5 * MIB)]
    check("a multipart object's ETag is S3's (MD5 of the parts' MD5s, -N)", head["ETag"] == multipart_etag(chunks), head["ETag"])
    check("a multipart object keeps the upload's content type and metadata", head["ContentType"] == "video/x-test" and head["Metadata"] == {"m": "1"} and head["ContentLength"] == len(data))
    check("a multipart object reads back whole", body_of("suite", "mpu/managed") == data)
    for a, b in [(5 * MIB - 2, 5 * MIB + 1), (0, 17 * MIB + 2), (10 * MIB - 1, 15 * MIB), (17 * MIB, 17 * MIB + 2)]:
        check(f"range {a}-{b} of a multipart object, across its parts", body_of("suite", "mpu/managed", Range=f"bytes={a}-{b}") == data[a : b + 1])
    out = io.BytesIO()
    s3.download_fileobj("suite", "mpu/managed", out, Config=config)
    check("download_fileobj (ranged, concurrent) of a multipart object", out.getvalue() == data)
    listed = s3.list_objects_v2(Bucket="suite", Prefix="mpu/managed")["Contents"][0]
    check("the listing shows a multipart object's size and ETag", listed["Size"] == len(data) and listed["ETag"] == head["ETag"])
    for n, chunk in enumerate(chunks, start=1):
        got = s3.get_object(Bucket="suite", Key="mpu/managed", PartNumber=n)
        check(f"GET ?partNumber={n} is that part, with the parts count", got["Body"].read() == chunk and got["PartsCount"] == len(chunks) and got["ContentLength"] == len(chunk), (got.get("PartsCount"), got.get("ContentRange")))
    head = s3.head_object(Bucket="suite", Key="mpu/managed", PartNumber=4)
    check("HEAD ?partNumber says the part's length", head["ContentLength"] == len(chunks[3]) and head["PartsCount"] == 4, head["ContentLength"])
    check("a part number past the last is InvalidPartNumber", error_of(lambda: s3.get_object(Bucket="suite", Key="mpu/managed", PartNumber=5)) == ("InvalidPartNumber", 416))
    check("part 1 of an object put whole is all of it", body_of("suite", "meta", PartNumber=1) == b"hello, metadata")

    # The calls one by one: parts out of order, a part uploaded again, ListParts, ListMultipartUploads.
    p1, p1b, p2, p3 = (rng.randbytes(n) for n in (5 * MIB, 5 * MIB + 9, 6 * MIB, 77))
    up = s3.create_multipart_upload(Bucket="suite", Key="mpu/manual", ContentType="text/x-mpu")["UploadId"]
    e2 = s3.upload_part(Bucket="suite", Key="mpu/manual", UploadId=up, PartNumber=2, Body=p2)["ETag"]
    s3.upload_part(Bucket="suite", Key="mpu/manual", UploadId=up, PartNumber=1, Body=p1)
    e1 = s3.upload_part(Bucket="suite", Key="mpu/manual", UploadId=up, PartNumber=1, Body=p1b)["ETag"]
    e3 = s3.upload_part(Bucket="suite", Key="mpu/manual", UploadId=up, PartNumber=3, Body=p3)["ETag"]
    check("a part's ETag is its MD5", e1 == f'"{hashlib.md5(p1b).hexdigest()}"' and e3 == f'"{hashlib.md5(p3).hexdigest()}"')
    parts = s3.list_parts(Bucket="suite", Key="mpu/manual", UploadId=up)["Parts"]
    check("ListParts lists each part once, the last upload of it", [(p["PartNumber"], p["Size"], p["ETag"]) for p in parts] == [(1, len(p1b), e1), (2, len(p2), e2), (3, len(p3), e3)], parts)
    page = s3.list_parts(Bucket="suite", Key="mpu/manual", UploadId=up, MaxParts=2)
    rest = s3.list_parts(Bucket="suite", Key="mpu/manual", UploadId=up, PartNumberMarker=page["NextPartNumberMarker"])
    check("ListParts pages", page["IsTruncated"] and [p["PartNumber"] for p in page["Parts"]] == [1, 2] and [p["PartNumber"] for p in rest["Parts"]] == [3] and not rest["IsTruncated"])
    uploads = s3.list_multipart_uploads(Bucket="suite").get("Uploads", [])
    check("ListMultipartUploads shows the upload in progress", [(u["Key"], u["UploadId"]) for u in uploads] == [("mpu/manual", up)], uploads)
    check("the object does not exist before completion", error_of(lambda: s3.head_object(Bucket="suite", Key="mpu/manual"))[1] == 404)
    complete = lambda ps: s3.complete_multipart_upload(Bucket="suite", Key="mpu/manual", UploadId=up, MultipartUpload={"Parts": ps})
    check("a wrong part ETag is InvalidPart", error_of(lambda: complete([{"PartNumber": 1, "ETag": e2}, {"PartNumber": 2, "ETag": e2}]))[0] == "InvalidPart")
    check("a part never uploaded is InvalidPart", error_of(lambda: complete([{"PartNumber": 1, "ETag": e1}, {"PartNumber": 4, "ETag": e3}]))[0] == "InvalidPart")
    check("parts out of order are InvalidPartOrder", error_of(lambda: complete([{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}]))[0] == "InvalidPartOrder")
    check("a short part that is not the last is EntityTooSmall", error_of(lambda: complete([{"PartNumber": 3, "ETag": e3}, {"PartNumber": 4, "ETag": e3}]))[0] == "EntityTooSmall")
    # Parts 1 and 3 only: part 2 is left out, its bytes dropped.
    done = complete([{"PartNumber": 1, "ETag": e1}, {"PartNumber": 3, "ETag": e3}])
    check("CompleteMultipartUpload answers the object's ETag", done["ETag"] == multipart_etag([p1b, p3]), done["ETag"])
    check("the completed object is the listed parts in order", body_of("suite", "mpu/manual") == p1b + p3)
    check("it keeps the upload's content type", s3.head_object(Bucket="suite", Key="mpu/manual")["ContentType"] == "text/x-mpu")
    check("a completed upload is gone (ListParts)", error_of(lambda: s3.list_parts(Bucket="suite", Key="mpu/manual", UploadId=up))[0] == "NoSuchUpload")
    check("and cannot be completed again", error_of(lambda: complete([{"PartNumber": 1, "ETag": e1}]))[0] == "NoSuchUpload")
    check("no upload is left in progress", not s3.list_multipart_uploads(Bucket="suite").get("Uploads"))

    # Abort: the parts go and the key is untouched.
    up = s3.create_multipart_upload(Bucket="suite", Key="mpu/aborted")["UploadId"]
    s3.upload_part(Bucket="suite", Key="mpu/aborted", UploadId=up, PartNumber=1, Body=p1)
    s3.abort_multipart_upload(Bucket="suite", Key="mpu/aborted", UploadId=up)
    check("an aborted upload is gone", error_of(lambda: s3.list_parts(Bucket="suite", Key="mpu/aborted", UploadId=up))[0] == "NoSuchUpload")
    check("a part for an aborted upload is NoSuchUpload", error_of(lambda: s3.upload_part(Bucket="suite", Key="mpu/aborted", UploadId=up, PartNumber=2, Body=b"x"))[0] == "NoSuchUpload")
    check("an aborted upload made no object", error_of(lambda: s3.head_object(Bucket="suite", Key="mpu/aborted"))[1] == 404)
    check("an upload id of another key is NoSuchUpload", error_of(lambda: s3.list_parts(Bucket="suite", Key="mpu/other", UploadId=up))[0] == "NoSuchUpload")
    check("a made-up upload id is NoSuchUpload", error_of(lambda: s3.abort_multipart_upload(Bucket="suite", Key="mpu/x", UploadId="../../etc"))[0] == "NoSuchUpload")
    up = s3.create_multipart_upload(Bucket="suite", Key="mpu/numbers")["UploadId"]
    for n in (0, 10001):
        check(f"part number {n} is InvalidArgument", error_of(lambda: s3.upload_part(Bucket="suite", Key="mpu/numbers", UploadId=up, PartNumber=n, Body=b"x"))[0] == "InvalidArgument")

    # UploadPartCopy: parts copied from ranges of other objects (a multipart one among them).
    copied = s3.upload_part_copy(Bucket="suite", Key="mpu/numbers", UploadId=up, PartNumber=1, CopySource={"Bucket": "suite", "Key": "mpu/managed"}, CopySourceRange=f"bytes={MIB}-{7 * MIB - 1}")
    check("UploadPartCopy answers the copied range's MD5", copied["CopyPartResult"]["ETag"] == f'"{hashlib.md5(data[MIB : 7 * MIB]).hexdigest()}"')
    small = s3.upload_part_copy(Bucket="suite", Key="mpu/numbers", UploadId=up, PartNumber=2, CopySource={"Bucket": "suite", "Key": "meta"})
    check("a copy range past the source is InvalidRange", error_of(lambda: s3.upload_part_copy(Bucket="suite", Key="mpu/numbers", UploadId=up, PartNumber=3, CopySource={"Bucket": "suite", "Key": "meta"}, CopySourceRange="bytes=0-999999"))[0] == "InvalidRange")
    s3.complete_multipart_upload(Bucket="suite", Key="mpu/numbers", UploadId=up, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": copied["CopyPartResult"]["ETag"]}, {"PartNumber": 2, "ETag": small["CopyPartResult"]["ETag"]}]})
    check("an object of copied parts reads back", body_of("suite", "mpu/numbers") == data[MIB : 7 * MIB] + b"hello, metadata")

    # Flexible checksums on parts (CRC32, as SDKs send them), listed back at completion.
    up = s3.create_multipart_upload(Bucket="suite", Key="mpu/crc", ChecksumAlgorithm="CRC32")["UploadId"]
    done_parts = []
    for n, body in enumerate([p1, p3], start=1):
        r = s3.upload_part(Bucket="suite", Key="mpu/crc", UploadId=up, PartNumber=n, Body=body, ChecksumAlgorithm="CRC32")
        want = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        check(f"part {n}'s CRC32 is verified and answered", r.get("ChecksumCRC32") == want, r.get("ChecksumCRC32"))
        done_parts.append({"PartNumber": n, "ETag": r["ETag"], "ChecksumCRC32": r["ChecksumCRC32"]})
    wrong = [dict(done_parts[0], ChecksumCRC32=base64.b64encode(b"\0\0\0\0").decode()), done_parts[1]]
    check("a part listed with another checksum is InvalidPart", error_of(lambda: s3.complete_multipart_upload(Bucket="suite", Key="mpu/crc", UploadId=up, MultipartUpload={"Parts": wrong}))[0] == "InvalidPart")
    bare = client(request_checksum_calculation="when_required")
    check("a part without the upload's checksum is InvalidRequest", error_of(lambda: bare.upload_part(Bucket="suite", Key="mpu/crc", UploadId=up, PartNumber=3, Body=b"no crc"))[0] == "InvalidRequest")
    s3.complete_multipart_upload(Bucket="suite", Key="mpu/crc", UploadId=up, MultipartUpload={"Parts": done_parts})
    check("a multipart object with part checksums reads back", body_of("suite", "mpu/crc") == p1 + p3)

    # Overwriting and copying a multipart object; its pieces go with it.
    s3.copy_object(Bucket="suite", Key="mpu/copy", CopySource={"Bucket": "suite", "Key": "mpu/managed"})
    check("a copy of a multipart object is put whole (its ETag the MD5)", s3.head_object(Bucket="suite", Key="mpu/copy")["ETag"] == f'"{hashlib.md5(data).hexdigest()}"')
    s3.put_object(Bucket="suite", Key="mpu/managed", Body=b"small now")
    check("a multipart object overwritten reads the new bytes", body_of("suite", "mpu/managed") == b"small now")
    check("its copy is untouched", body_of("suite", "mpu/copy") == data)

    # ListMultipartUploads pages by key and upload id; DeleteBucket aborts what is left.
    s3.create_bucket(Bucket="mpu-list")
    made = sorted((k, s3.create_multipart_upload(Bucket="mpu-list", Key=k)["UploadId"]) for k in ["b", "a/1", "a/2", "b", "c"])
    seen, marker = [], {}
    while True:
        page = s3.list_multipart_uploads(Bucket="mpu-list", MaxUploads=2, **marker)
        seen += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        if not page["IsTruncated"]:
            break
        marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
    check("ListMultipartUploads pages through every upload, by key", [k for k, _ in seen] == [k for k, _ in made] and sorted(seen) == made, seen)
    entries = []
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket="mpu-list", Delimiter="/", PaginationConfig={"PageSize": 1}):
        entries += [u["Key"] for u in page.get("Uploads", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    check("ListMultipartUploads pages past a common prefix, one entry a page", sorted(entries) == ["a/", "b", "b", "c"], entries)
    empty = s3.list_multipart_uploads(Bucket="mpu-list", MaxUploads=0)
    check("max-uploads=0 is an empty page, not truncated", not empty["IsTruncated"] and not empty.get("Uploads"))
    grouped = s3.list_multipart_uploads(Bucket="mpu-list", Delimiter="/")
    check("ListMultipartUploads groups by delimiter", [p["Prefix"] for p in grouped.get("CommonPrefixes", [])] == ["a/"] and [u["Key"] for u in grouped["Uploads"]] == ["b", "b", "c"], grouped)
    s3.upload_part(Bucket="mpu-list", Key="c", UploadId=dict(made)["c"], PartNumber=1, Body=b"left behind")
    if CLUSTER:
        # On a cluster, DeleteBucket leaves uploads to their keys' coordinators (docs/s3.md).
        check("on a cluster, a bucket with uploads in progress is not deleted", error_of(lambda: s3.delete_bucket(Bucket="mpu-list"))[0] == "BucketNotEmpty")
        for key, upload in made:
            s3.abort_multipart_upload(Bucket="mpu-list", Key=key, UploadId=upload)
    s3.delete_bucket(Bucket="mpu-list")
    s3.create_bucket(Bucket="mpu-list")
    check("deleting a bucket aborted its uploads", not s3.list_multipart_uploads(Bucket="mpu-list").get("Uploads"))
    s3.delete_bucket(Bucket="mpu-list")


def transfers():
    # upload_fileobj / download_fileobj as applications use them, whole (multipart: above).
    data = os.urandom(5 << 20)
    config = TransferConfig(multipart_threshold=1 << 40)
    s3.upload_fileobj(io.BytesIO(data), "suite", "five-mib", Config=config)
    out = io.BytesIO()
    s3.download_fileobj("suite", "five-mib", out, Config=config)
    check("upload_fileobj / download_fileobj of 5 MiB", out.getvalue() == data)


def main():
    for step in [buckets, sizes, metadata_and_checksums, conditionals, deletes_and_copies, odd_keys, listings, presigned, credentials, overwrites, read_during_overwrite, multipart, transfers]:
        print(f"-- {step.__name__}", flush=True)
        step()
    print("ALL PASSED", flush=True)


if __name__ == "__main__":
    main()
