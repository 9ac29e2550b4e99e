"""Running the event: the Gateway (start-up and shutdown) and one AccountWatcher per desktop.

A desktop's backend is called only by that desktop's watcher; everything else sends it a command.
May import every layer below: web, proxies, backends, model, common.
"""
