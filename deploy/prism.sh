#!/usr/bin/env bash
# Builds Beam's Prism runner from Beam's Go module at the installed Beam version, into
# newsbeam's cache, where `newsbeam run` finds it by itself (so an offline machine runs on
# Prism too). Needs Go; about 3 minutes the first time, then Go's module and build caches
# make it quick, and an existing binary is kept. Without Go it says so and exits 0: newsbeam
# then uses Beam's own download of Prism, or the FnApiRunner offline.
# Prints the binary's path on stdout when there is one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
TARGET="$("$PY" -m newsbeam.pipeline.runner)"
if [ -x "$TARGET" ]; then
  echo "$TARGET"; exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "[newsbeam] go not found: Prism is not built (newsbeam uses Beam's download of it, or the FnApiRunner)" >&2
  exit 0
fi
VERSION="$("$PY" -c 'from importlib import metadata; print(metadata.version("apache-beam"))')"
DIR="$(dirname "$TARGET")"
mkdir -p "$DIR"
echo "[newsbeam] building Prism v$VERSION with $(go version | cut -d' ' -f3) into $DIR (a few minutes, once)" >&2
PARTIAL="$(mktemp -d "$DIR/.build-XXXXXX")"
trap 'rm -rf "$PARTIAL"' EXIT
GOBIN="$PARTIAL" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "github.com/apache/beam/sdks/v2/go/cmd/prism@v$VERSION" >&2
mv "$PARTIAL/prism" "$TARGET"
echo "$TARGET"
