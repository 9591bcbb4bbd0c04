# Shared by quickstart.sh and test.sh: a Python 3.11+ virtualenv in .venv with newsbeam installed.
# pip's cache (~/.cache/pip) and Maven's (~/.m2) keep later runs fast and offline-friendly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)'; then
      PYTHON="$candidate"; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "newsbeam needs Python 3.11 or 3.12 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "[newsbeam] creating .venv with $PYTHON" >&2
  "$PYTHON" -m venv .venv
fi
install_newsbeam() {  # $1: extras, e.g. "[test]"
  local stamp=".venv/.installed$1" 
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "[newsbeam] installing newsbeam$1 and its dependencies (cached after the first run)" >&2
    .venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip >&2
    .venv/bin/python -m pip install --disable-pip-version-check -q -e ".$1" >&2
    touch "$stamp"
  fi
}
