#!/usr/bin/env bash
# Installs newsbeam, starts a local Elasticsearch unless ELASTICSEARCH_URL points at one,
# and runs the streaming pipeline over configs/feeds.yaml. Extra arguments go to `newsbeam run`
# (e.g. --duration 600, --feed URL, --runner FlinkRunner ...).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
install_newsbeam ""
deploy/prism.sh >/dev/null || echo "[newsbeam] Prism could not be built (see above)" >&2
if [ -z "${ELASTICSEARCH_URL:-}" ]; then
  ELASTICSEARCH_URL="$(.venv/bin/python -m newsbeam.pipeline.local_es start)"
  export ELASTICSEARCH_URL
  echo "[newsbeam] local Elasticsearch at $ELASTICSEARCH_URL (stop it with: .venv/bin/python -m newsbeam.pipeline.local_es stop)" >&2
fi
exec .venv/bin/newsbeam run "$@"
