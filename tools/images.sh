#!/usr/bin/env bash
# Builds the two images of this repository with the first container builder found:
#   <registry>/operator:<version>  from operator/Dockerfile (peer-recovery[operator], no torch)
#   <registry>/trainer:<version>   from examples/trainer/Dockerfile (peer-recovery[runtime])
# <version> is the package's version in pyproject.toml (the chart's appVersion, so the
# chart's default image tag); <registry> is $IMAGE_REGISTRY (default ghcr.io/peer-recovery).
# `make images` runs this. $CONTAINER_BUILDER picks the builder (a command taking
# `build -t TAG -f FILE DIR`); otherwise docker, podman, nerdctl, then buildah on PATH.
# With none, or one whose engine is not running (`<builder> info` fails), it says so and
# exits 3 (nothing is built).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

registry="${IMAGE_REGISTRY:-ghcr.io/peer-recovery}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)"
if [[ -z "$version" ]]; then
  echo "images.sh: no version = \"...\" line in pyproject.toml" >&2
  exit 2
fi

builder="${CONTAINER_BUILDER:-}"
if [[ -z "$builder" ]]; then
  for candidate in docker podman nerdctl buildah; do
    if command -v "$candidate" >/dev/null 2>&1; then
      builder="$candidate"
      break
    fi
  done
fi
if [[ -z "$builder" ]]; then
  echo "make images: no container builder: none of docker, podman, nerdctl, buildah is on" \
    "PATH. Install one, or set CONTAINER_BUILDER=<command> (it must take" \
    "'build -t TAG -f DOCKERFILE DIR'). Nothing was built." >&2
  exit 3
fi
if ! command -v "$builder" >/dev/null 2>&1; then
  echo "make images: CONTAINER_BUILDER=$builder is not a command on PATH" >&2
  exit 3
fi
# A client without its engine (docker without a running daemon) cannot build either.
if ! info="$(timeout 60 "$builder" info 2>&1 >/dev/null)"; then
  echo "make images: $builder is installed but cannot build here ('$builder info' failed:" \
    "$(tail -n 1 <<<"$info")). Start its engine, or set CONTAINER_BUILDER to another" \
    "builder. Nothing was built." >&2
  exit 3
fi

for image in "operator:operator/Dockerfile" "trainer:examples/trainer/Dockerfile"; do
  name="${image%%:*}"
  dockerfile="${image#*:}"
  tag="$registry/$name:$version"
  echo "images.sh: $builder build -t $tag -f $dockerfile ." >&2
  "$builder" build -t "$tag" -f "$dockerfile" .
  echo "$tag"
done
