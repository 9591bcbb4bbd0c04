"""newsbeam's launcher side: settings, Elasticsearch set-up, pipeline assembly and the CLI."""
