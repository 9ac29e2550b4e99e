"""The ``gateway`` command: argument parsing and output, on top of every other layer.

:func:`gateway.cli.main` is the entry point.
"""
