#!/usr/bin/env bash
# Builds the vmnic node image from the repository's Dockerfile and writes it
# as an OCI archive (containerd's `ctr images import`, podman load and
# skopeo take it):
#
#   deploy/image/build.sh [-t TAG] [-o ARCHIVE] [-n NAME] [-c CONTEXT -f DOCKERFILE]
#
# NAME defaults to vmnic, TAG to `git describe`, ARCHIVE to
# bin/vmnic-image-TAG.tar. The binaries come from bin/ (make build writes
# them; `make image` runs it first). -c and -f build another image the same
# way (the tests' pause image): a context directory and its Dockerfile.
#
# The builder is buildah when it is installed (no daemon; private storage
# under .tools/buildah, each image removed once written), else podman, else
# docker (which writes a docker-archive, which containerd imports as well). Prints the archive's path on stdout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
name=vmnic tag=$(git describe --tags --always --dirty 2>/dev/null || echo dev) out= context=. dockerfile=Dockerfile
while getopts t:o:n:c:f: opt; do
  case $opt in
    t) tag=$OPTARG ;;
    o) out=$OPTARG ;;
    n) name=$OPTARG ;;
    c) context=$OPTARG ;;
    f) dockerfile=$OPTARG ;;
    *) exit 2 ;;
  esac
done
out=${out:-bin/$name-image-$tag.tar}
if [[ $context == . ]]; then
  for b in vmnic vmnicd vmnicctl; do
    [[ -x bin/$b ]] || { echo "image: bin/$b is missing: run make build first" >&2; exit 1; }
  done
fi
ref=$name:$tag
mkdir -p "$(dirname "$out")"
tmp=$out.tmp.$$
trap 'rm -f "$tmp"' EXIT
start=$(date +%s%N)
if command -v buildah >/dev/null; then
  store=$root/.tools/buildah
  mkdir -p "$store"
  # Nothing is pulled (FROM scratch); the policy only has to let buildah
  # write the archive.
  printf '{"default":[{"type":"insecureAcceptAnything"}]}\n' >"$store/policy.json"
  b=(buildah --root "$store/root" --runroot "$store/run" --storage-driver overlay)
  "${b[@]}" bud --quiet --isolation chroot --signature-policy "$store/policy.json" \
    -t "$ref" -f "$dockerfile" "$context" >/dev/null
  # The archive names the image as the runtime will ask for it: kubelet
  # asks containerd for "vmnic:TAG" as docker.io/library/vmnic:TAG, and ctr
  # import takes the archive's name literally.
  full=$ref
  first=${name%%/*}
  if [[ $name != */* || ( $first != *.* && $first != *:* && $first != localhost ) ]]; then
    full=docker.io/$([[ $name == */* ]] || echo library/)$ref
  fi
  "${b[@]}" push --quiet --signature-policy "$store/policy.json" "$ref" "oci-archive:$tmp:$full"
  "${b[@]}" rmi "$ref" >/dev/null
elif command -v podman >/dev/null; then
  podman build --quiet -t "$ref" -f "$dockerfile" "$context" >/dev/null
  podman save --quiet --format oci-archive -o "$tmp" "$ref"
elif command -v docker >/dev/null; then
  docker build --quiet -t "$ref" -f "$dockerfile" "$context" >/dev/null
  docker save -o "$tmp" "$ref"
else
  echo "image: no image builder: install buildah (Debian: apt-get install buildah), podman or docker" >&2
  exit 1
fi
mv -f "$tmp" "$out"
trap - EXIT
echo "image: $ref -> $out in $(( ($(date +%s%N) - start) / 1000000 )) ms" >&2
echo "$out"
