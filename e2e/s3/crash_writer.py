"""kill -9 during S3 uploads (e2e/tests/s3.rs).

`write`: four threads, each on its own keys, put (sizes across piece boundaries; some as
multipart uploads of 5 MiB parts), overwrite and delete objects, printing `begin <thread> <op>`
before a request and `acked <thread> <op>` once it was answered, where <op> is
`put <key> <md5> <etag>` or `del <key>`; runs until killed.

`verify`: reads those lines (cut at the kill) and checks each key: it holds what its last
acknowledged operation left, or what the one in flight at the kill would have left — the bytes
whole (MD5), the listing in agreement (its ETag that operation's). Then it aborts every upload
the kill left in progress and checks every key again: aborting never takes bytes an object
holds. Exits non-zero naming the first key that is wrong.
"""

import hashlib
import os
import random
import sys
import threading

import io

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

PIECE = int(os.environ["S3_PIECE_BYTES"])
BUCKET = "crash"
PART = 5 << 20
MULTIPART = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=2)


def etag_of(data, multipart):
    if not multipart:
        return hashlib.md5(data).hexdigest()
    parts = [data[i : i + PART] for i in range(0, len(data), PART)]
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    return f"{hashlib.md5(joined).hexdigest()}-{len(parts)}"


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["S3_ENDPOINT"],
        aws_access_key_id=os.environ["S3_KEY_ID"],
        aws_secret_access_key=os.environ["S3_SECRET"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30),
    )


def write():
    s3 = client()
    s3.create_bucket(Bucket=BUCKET)
    lock = threading.Lock()

    def say(line):
        with lock:
            print(line, flush=True)

    def worker(t):
        rng = random.Random(t)
        s3 = client()
        keys = [f"t{t}/k{i}" for i in range(6)]
        while True:
            key = rng.choice(keys)
            if rng.random() < 0.2:
                op = f"del {key}"
                say(f"begin {t} {op}")
                s3.delete_object(Bucket=BUCKET, Key=key)
            elif rng.random() < 0.15:
                data = os.urandom(PART + rng.randrange(PART + 1))
                op = f"put {key} {hashlib.md5(data).hexdigest()} {etag_of(data, True)}"
                say(f"begin {t} {op}")
                s3.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=MULTIPART)
            else:
                data = os.urandom(rng.choice([0, 1, PIECE - 1, PIECE, PIECE + 1, 2 * PIECE + 7, rng.randrange(3 * PIECE)]))
                op = f"put {key} {hashlib.md5(data).hexdigest()} {etag_of(data, False)}"
                say(f"begin {t} {op}")
                s3.put_object(Bucket=BUCKET, Key=key, Body=data)
            say(f"acked {t} {op}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def state_of(op):
    """What an operation leaves: the object's (MD5, ETag), or None for no object."""
    parts = op.split(" ")
    return (parts[2], parts[3]) if parts[0] == "put" else None


def verify():
    acked = {}  # key -> state after its last acknowledged op
    in_flight = {}  # thread -> (key, state) begun and not acknowledged
    for line in sys.stdin.read().splitlines():
        words = line.split(" ")
        # The last line may be cut where the writer was killed: such a line says nothing.
        if len(words) < 4 or words[2] not in ("put", "del") or (words[2] == "put" and len(words) < 6):
            continue
        kind, thread, op = line.split(" ", 2)
        key = op.split(" ")[1]
        if kind == "begin":
            in_flight[thread] = (key, state_of(op))
        elif kind == "acked":
            acked[key] = state_of(op)
            in_flight.pop(thread, None)
    allowed = {key: {state} for key, state in acked.items()}
    for key, state in in_flight.values():
        allowed.setdefault(key, {None}).add(state)
    s3 = client()
    check_keys(s3, allowed)
    print(f"ok: {len(allowed)} keys as acknowledged after kill -9", flush=True)
    uploads = [u for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=BUCKET) for u in page.get("Uploads", [])]
    for upload in uploads:
        s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
    check_keys(s3, allowed)
    left = [u for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=BUCKET) for u in page.get("Uploads", [])]
    if left:
        print(f"FAILED: uploads left after aborting them: {left}", flush=True)
        sys.exit(1)
    print(f"ok: {len(uploads)} uploads cut by the kill aborted, every key still whole", flush=True)


def check_keys(s3, allowed):
    listed = {o["Key"]: o["ETag"].strip('"') for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])}
    for key, states in sorted(allowed.items()):
        try:
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            found = hashlib.md5(body).hexdigest()
        except ClientError as e:
            if e.response["Error"]["Code"] != "NoSuchKey":
                raise
            found = None
        etags = {state[0]: state[1] for state in states if state}
        if found is not None and found not in etags or found is None and None not in states:
            print(f"FAILED: {key} holds {found}, expected one of {states}", flush=True)
            sys.exit(1)
        if listed.get(key) != etags.get(found):
            print(f"FAILED: {key} is listed as {listed.get(key)} but reads as {found} (ETag {etags.get(found)})", flush=True)
            sys.exit(1)
    extra = set(listed) - set(allowed)
    if extra:
        print(f"FAILED: keys listed that were never written: {sorted(extra)}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    {"write": write, "verify": verify}[sys.argv[1]]()
