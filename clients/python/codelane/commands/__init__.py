"""Client-side subcommands of the `codelane` CLI."""
