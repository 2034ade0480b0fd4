"""`python -m crucible_record` is the `crucible-record` command."""

from .cli import main

main()
