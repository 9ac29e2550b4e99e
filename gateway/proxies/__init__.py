"""What carries a browser's websocket to a desktop: websockify modes, the builtin relay, the Apache front.

May import: :mod:`gateway.backends` (its public interface: endpoints), :mod:`gateway.model`,
:mod:`gateway.common`. Never :mod:`gateway.web` (a sibling layer).
"""
