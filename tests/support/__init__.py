"""What the tests and the benchmarks share: HTTP servers on loopback (feeds, hostile
endpoints, a fault-injecting proxy, webhook and SMTP receivers), a runner for the `newsbeam`
command and a factory for its config files. Import as `tests.support.NAME` from the
repository root (pytest's rootdir; `python -m bench.NAME` for the benchmarks)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
