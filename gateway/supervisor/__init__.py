"""Running the event: the Gateway (start-up and shutdown) and one AccountWatcher per desktop.

A desktop's backend is called only by that desktop's watcher (``watcher``); everything else sends it
a typed command (``commands``). ``gateway`` starts and stops; ``front`` is its web side (pages,
control socket, Apache); ``recover`` handles what a crashed gateway left (shared with `gateway
down`); ``extend``, ``idle``, ``after_event``, ``archive_event`` (`gateway archive`) and ``archive_mail`` are
the event's other policies.
May import every layer below: web, proxies, backends, model, common.
"""
