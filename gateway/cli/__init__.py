"""The ``gateway`` command: argument parsing and output, on top of every other layer (it may import them all).

:func:`gateway.cli.main.main` is the entry point; the commands live in ``lifecycle`` (up, down, users),
``control`` (status, desktop, extend), ``prepare`` (tokens, container, systemd, apache-config) and
``accounts`` (accounts, archive), with ``checks`` and ``shared`` beside them.
"""
