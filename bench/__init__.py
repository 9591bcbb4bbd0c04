"""Benchmarks that print figures; run from the repository root as `python -m bench.NAME`."""

from newsbeam.transforms.logs import drop_beam_import_notice

drop_beam_import_notice()  # before any script imports apache_beam
