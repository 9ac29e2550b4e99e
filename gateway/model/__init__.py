"""The event's data: token file, configuration, state database, desktop status, sign-ups, errors.

Pure data and its files: no processes, no network. May import: :mod:`gateway.common`.
"""
