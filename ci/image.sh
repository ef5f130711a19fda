#!/usr/bin/env bash
# Build one vendor image and run its default command (info, the vendor's tests,
# the quick benchmark) with the GPU passed through, on a runner that has one.
#   bash ci/image.sh cuda|rocm|xpu [OUT_DIR]
# OUT_DIR (default image-out/VENDOR) receives info.json, pytest.xml, bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
vendor=${1:?usage: ci/image.sh cuda|rocm|xpu [OUT_DIR]}
out=${2:-image-out/$vendor}
case "$vendor" in
  rocm) gpu=(--device /dev/kfd --device /dev/dri --group-add video --security-opt seccomp=unconfined) ;;
  cuda) gpu=(--gpus all) ;;
  xpu) gpu=(--device /dev/dri) ;;
  *) echo "ci/image.sh: vendor must be cuda, rocm or xpu, got '$vendor'" >&2; exit 2 ;;
esac
tag="rocmoe:$vendor-$(git rev-parse --short HEAD)"
docker build -f "docker/Dockerfile.$vendor" -t "$tag" .
mkdir -p "$out"
chmod a+rwx "$out"  # the image runs as an unprivileged user
docker run --rm "${gpu[@]}" -v "$(realpath "$out"):/opt/rocmoe/out" "$tag"
ls -l "$out"
