"""kill -9 during S3 uploads (e2e/tests/s3.rs).

`write`: four threads, each on its own keys, put (sizes across piece boundaries), overwrite and
delete objects, printing `begin <thread> <op>` before a request and `acked <thread> <op>` once
it was answered, where <op> is `put <key> <md5>` or `del <key>`; runs until killed.

`verify`: reads those lines (cut at the kill) and checks each key: it holds what its last
acknowledged operation left, or what the one in flight at the kill would have left — the bytes
whole (MD5), the listing in agreement. Exits non-zero naming the first key that is wrong.
"""

import hashlib
import os
import random
import sys
import threading

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

PIECE = int(os.environ["S3_PIECE_BYTES"])
BUCKET = "crash"


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
            else:
                data = os.urandom(rng.choice([0, 1, PIECE - 1, PIECE, PIECE + 1, 2 * PIECE + 7, rng.randrange(3 * PIECE)]))
                op = f"put {key} {hashlib.md5(data).hexdigest()}"
                say(f"begin {t} {op}")
                s3.put_object(Bucket=BUCKET, Key=key, Body=data)
            say(f"acked {t} {op}")

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def state_of(op):
    """What an operation leaves: the object's MD5, or None for no object."""
    parts = op.split(" ")
    return parts[2] if parts[0] == "put" else None


def verify():
    acked = {}  # key -> state after its last acknowledged op
    in_flight = {}  # thread -> (key, state) begun and not acknowledged
    for line in sys.stdin.read().splitlines():
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
    listed = {o["Key"]: o["ETag"].strip('"') for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])}
    for key, states in sorted(allowed.items()):
        try:
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            found = hashlib.md5(body).hexdigest()
        except ClientError as e:
            if e.response["Error"]["Code"] != "NoSuchKey":
                raise
            found = None
        if found not in states:
            print(f"FAILED: {key} holds {found}, expected one of {states}", flush=True)
            sys.exit(1)
        if listed.get(key) != found:
            print(f"FAILED: {key} is listed as {listed.get(key)} but reads as {found}", flush=True)
            sys.exit(1)
    extra = set(listed) - set(allowed)
    if extra:
        print(f"FAILED: keys listed that were never written: {sorted(extra)}", flush=True)
        sys.exit(1)
    print(f"ok: {len(allowed)} keys as acknowledged after kill -9", flush=True)


if __name__ == "__main__":
    {"write": write, "verify": verify}[sys.argv[1]]()
