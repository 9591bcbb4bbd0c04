#!/usr/bin/env bash
# Local Elasticsearch from Maven Central's integ-test zip: fetch | start | stop | status.
# Options: --dir DIR --port PORT --heap 512m --security (see `python3 -m newsbeam.pipeline.local_es -h`).
cd "$(dirname "${BASH_SOURCE[0]}")/.." && exec python3 -m newsbeam.pipeline.local_es "$@"
