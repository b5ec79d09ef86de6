"""One module per ``cfp`` subcommand; each has ``register(subparsers)``."""
