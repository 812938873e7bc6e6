"""The command line: the click group and one module per command; the only code that prints or exits."""

from clm_runner.cli.app import cli, main

__all__ = ["cli", "main"]
