"""`lfm-edge` subcommands: each module has configure_parser() and main()."""
