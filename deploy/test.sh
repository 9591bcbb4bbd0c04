#!/usr/bin/env bash
# Installs newsbeam with its test dependencies and runs the whole test suite. The suite
# starts its own Elasticsearch nodes (security off and on) and HTTP servers on 127.0.0.1;
# the external suite (tests/external) runs when ../shared is present. The end-to-end scenarios
# run on the FnApiRunner and on Prism (built by deploy/prism.sh when Go is installed; else that
# leg is skipped, and says why).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
install_newsbeam "[test]"
.venv/bin/python -m newsbeam.pipeline.local_es fetch >/dev/null
deploy/prism.sh >/dev/null || echo "[newsbeam] Prism could not be built (see above): its test leg is skipped" >&2
echo "[newsbeam] ruff check and import contracts" >&2
.venv/bin/ruff check .
.venv/bin/lint-imports >/dev/null || .venv/bin/lint-imports
# Two tests at a time (NEWSBEAM_TEST_WORKERS; 0 runs them one by one): most of them wait, not
# compute. The tests that need the secured node run on one worker (`--dist loadgroup`).
exec .venv/bin/python -m pytest -n "${NEWSBEAM_TEST_WORKERS:-2}" --dist loadgroup "$@"
