"""Plumbing every layer may use: processes, files, templates, polling, rate limits, RFB, HTTP front-door checks.

May import: the standard library and third-party packages only, never another ``gateway`` package.
"""
