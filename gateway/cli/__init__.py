"""The ``gateway`` command: argument parsing and output, on top of every other layer (it may import them all).

:func:`gateway.cli.main` is the entry point.
"""
