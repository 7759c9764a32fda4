"""The `dumont` command line: a client of the Dumont Cloud API. Imports nothing of Django."""

__version__ = "0.1.0"
