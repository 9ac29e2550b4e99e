"""The gateway's web app: landing and viewer pages, participants, the organiser's cockpit, files, DCV.

:mod:`gateway.web.app` composes every route. May import: :mod:`gateway.backends`' public interface
(never a backend's own module), :mod:`gateway.model`, :mod:`gateway.common`. Never :mod:`gateway.proxies`.
"""
