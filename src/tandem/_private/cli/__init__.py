"""The `tandem` command: parse the command line, build a config, run a serving session,
or talk to a running server's control endpoint."""
