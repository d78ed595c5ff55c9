#!/usr/bin/env bash
# Builds Cairn and runs a whole cluster on this machine with `cairn local up` (etcd, a disk
# agent, three datanodes and the operator's reconcile, from examples/local.yaml); stores a blob
# through one datanode and reads it back through another, shows `cairn status`, then stops everything.
# Pass --keep to leave the cluster running (stop it with Ctrl-C in its terminal, or kill the pid).
# CAIRN_PORT (7480) and CAIRN_ETCD_PORT (23790) choose the ports; CAIRN_LOCAL_DIR the directory.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --workspace
dir=${CAIRN_LOCAL_DIR:-$(mktemp -d)}
own_dir=${CAIRN_LOCAL_DIR:+no}
port=${CAIRN_PORT:-7480}
etcd_port=${CAIRN_ETCD_PORT:-23790}
./target/release/cairn local up -f examples/local.yaml --dir "$dir" --port "$port" --etcd-port "$etcd_port" >"$dir/up.log" 2>&1 &
pid=$!
keep=${1:-}
# Unless --keep: stop the cluster, and remove its data when the directory was ours.
trap '[ "$keep" = --keep ] || { kill -INT $pid 2>/dev/null; wait $pid 2>/dev/null || true; [ -n "$own_dir" ] || rm -rf "$dir"; }' EXIT
for _ in $(seq 600); do grep -q ': ready' "$dir/up.log" 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 0.1; done
grep -q ': ready' "$dir/up.log" || { echo "the local cluster did not become ready:"; cat "$dir/up.log"; exit 1; }
cat "$dir/up.log"
# The admin key `cairn local up` made (docs/security.md): without it the blob API answers 401.
echo "\$ export CAIRN_TOKEN=\$(cat $dir/admin-token)"
CAIRN_TOKEN=$(cat "$dir/admin-token")
auth="Authorization: Bearer $CAIRN_TOKEN"
echo '$ curl -H "Authorization: Bearer $CAIRN_TOKEN" -X POST --data-binary "hello, cairn" http://127.0.0.1:'$port'/v1/blobs'
reply=$(curl -fsS -H "$auth" -X POST --data-binary "hello, cairn" -H 'Content-Type: text/plain' "http://127.0.0.1:$port/v1/blobs")
echo "$reply"
id=$(printf '%s' "$reply" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
other=$((port + 2))
echo "\$ curl -H \"Authorization: Bearer \$CAIRN_TOKEN\" http://127.0.0.1:$other/v1/blobs/$id      # another datanode"
curl -fsS -H "$auth" "http://127.0.0.1:$other/v1/blobs/$id"; echo
echo "\$ curl http://127.0.0.1:$other/v1/blobs/$id      # no key: refused"
curl -sS "http://127.0.0.1:$other/v1/blobs/$id"; echo
echo "\$ cairn status --local $dir"
./target/release/cairn status --local "$dir"
if [ "${1:-}" = --keep ]; then echo "cluster left running (pid $pid, data in $dir)"; fi
