"""One module per `radregion` subcommand: `register(subparsers) -> parser` and `run(args) -> int`."""
