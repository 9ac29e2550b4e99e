"""Workshop desktop gateway: one command brings up a browser desktop per participant."""

__version__ = "0.1.0"
