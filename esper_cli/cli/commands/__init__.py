"""One module per CLI command; their shared helpers are `esper_cli.cli.common`, `options` and `tables`."""
