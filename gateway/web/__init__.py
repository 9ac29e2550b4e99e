"""The gateway's web app: landing and viewer pages, participants, the organiser's cockpit, files, DCV.

:mod:`gateway.web.app` composes every route, and only it imports the route modules (``pages``,
``signup``, ``participant``, ``dcv_proxy``, ``transfer``, ``watch``, ``wall``, ``cockpit``). They share
``context`` (app keys, the page renderer), ``sessions`` (participants' sign-in), ``admin_access`` (the
organisers' credential), ``terms`` and ``thumbnails``, never each other (the theme's colours are
:mod:`gateway.model.theme`, checked when the config is read).

May import: :mod:`gateway.backends`' public interface (never a backend's own module), :mod:`gateway.model`,
:mod:`gateway.common`. Never :mod:`gateway.proxies`.
"""
