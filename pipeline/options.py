"""Runtime flags of `newsbeam run`, as a PipelineOptions subclass so they travel with
the Beam options (`--runner`, `--flink_master`, ... pass straight through)."""
from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class NewsbeamOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser) -> None:
        parser.add_argument("--config", default=None,
                            help="pipeline settings (default: configs/pipeline.yaml)")
        parser.add_argument("--feed", action="append", default=None,
                            help="a feed URL to poll; repeatable; replaces the configured feed list")
        parser.add_argument("--feeds-file", "--feeds_file", dest="feeds_file", default=None,
                            help="a YAML feed list to poll instead of the configured one")
        parser.add_argument("--es-url", "--es_url", dest="es_url", default=None,
                            help="Elasticsearch URL (default: $ELASTICSEARCH_URL or the config)")
        parser.add_argument("--es-ca-certs", "--es_ca_certs", dest="es_ca_certs", default=None,
                            help="CA bundle to verify Elasticsearch's TLS certificate (or $ELASTICSEARCH_CA_CERTS)")
        parser.add_argument("--duration", type=float, default=None,
                            help="stop cleanly after this many seconds, flushing what is in flight")
        parser.add_argument("--poll-interval", "--poll_interval", dest="poll_interval", type=float,
                            default=None, help="seconds between polls of each feed (default: the config)")
        parser.add_argument("--fetch-shards", "--fetch_shards", dest="fetch_shards", type=int, default=8,
                            help="feeds are split into this many shards that workers fetch in parallel")
