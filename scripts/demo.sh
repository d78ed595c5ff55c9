#!/usr/bin/env bash
# Builds Cairn, starts a standalone datanode on a temporary directory, stores a blob and reads
# it back, then stops the node. Pass --keep to leave the node running.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -p cairn-datanode
data=$(mktemp -d)
addr=127.0.0.1:${CAIRN_PORT:-7480}
./target/release/cairn-datanode --data-dir "$data" --listen "$addr" --segment-size 256MiB --volume-size 1GiB \
  >"$data.log" 2>&1 &
pid=$!
trap '[ "${1:-}" = --keep ] || { kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data" "$data.log"; }' EXIT
for _ in $(seq 100); do curl -fs "http://$addr/healthz" >/dev/null && break; sleep 0.1; done
curl -fs "http://$addr/healthz" >/dev/null || { echo "datanode did not start:"; cat "$data.log"; exit 1; }
echo "datanode on http://$addr (data in $data)"
echo '$ curl -X POST --data-binary "hello, cairn" http://'$addr'/v1/blobs'
reply=$(curl -fsS -X POST --data-binary "hello, cairn" -H 'Content-Type: text/plain' "http://$addr/v1/blobs")
echo "$reply"
id=$(printf '%s' "$reply" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "\$ curl http://$addr/v1/blobs/$id"
curl -fsS "http://$addr/v1/blobs/$id"; echo
if [ "${1:-}" = --keep ]; then echo "node left running (pid $pid)"; fi
