"""The command line: the click group and one module per command; the only code that prints or exits.

The work lives in the other subpackages; a command parses, calls them and reports. Only click and the
standard library are imported here, so `clm-runner --help` answers at once.
"""

from clm_runner.cli import data, eval, export, generate, model, recipe, report, train  # noqa: F401 - registers commands
from clm_runner.cli.app import cli, main

__all__ = ["cli", "main"]
