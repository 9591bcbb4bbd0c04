"""Logging every newsbeam process shares: the CLI's, the worker processes'
(transforms/workers.py) and the benchmark scripts'."""
from __future__ import annotations

import logging


class _DropBeamImportNotice(logging.Filter):
    """Beam's GCP modules log "apitools not found ..." on import: noise for a tool that never
    talks to Google Cloud."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


def drop_beam_import_notice() -> None:
    """Installs the filter on the root logger (once); call it before anything imports apache_beam."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropBeamImportNotice) for f in root.filters):
        root.addFilter(_DropBeamImportNotice())
