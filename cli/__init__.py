"""The `vlsearch` command."""
