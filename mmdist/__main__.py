"""`python -m mmdist` is the `mmdist` command."""

from mmdist.cli import entry

entry()
