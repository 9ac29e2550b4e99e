"""What can be asked of one desktop: the one list of action names.

The admin page, the control socket, the command line (`gateway desktop ACTION`), share links and the
supervisor's watchers all speak of these actions; they are named here once, below every layer that
uses them (the web layer may not import the supervisor, where the commands are carried out).
"""

from __future__ import annotations

import enum

__all__ = ["Action", "ORGANISER_ACTIONS", "ORGANISER_ACTION_NAMES"]


class Action(enum.Enum):
    """What a watcher can be asked to do. The first four are organisers' actions (admin page, control socket)."""

    RESTART = "restart"
    STOP = "stop"
    START = "start"
    DISCONNECT = "disconnect"
    #: Rewrite the desktop's password file (a view-only password was replaced); no payload.
    REFRESH_PASSWORDS = "refresh-passwords"
    #: More time for the running desktop; payload: seconds (float).
    EXTEND = "extend"
    #: A participant's keyboard layout; payload: the layout name (str).
    KEYBOARD_LAYOUT = "keyboard-layout"
    #: A message shown inside the desktop (idle and end warnings); payload: the text (str).
    NOTIFY = "notify"

    @property
    def awaited(self) -> bool:
        """The caller relies on it being done, so it waits for the outcome (the others are fire-and-forget)."""
        return self not in ORGANISER_ACTIONS


#: What an organiser may do to a desktop by name (admin page, control socket, `gateway desktop`).
ORGANISER_ACTIONS = frozenset({Action.RESTART, Action.STOP, Action.START, Action.DISCONNECT})
#: Their names, in the order menus and help show them.
ORGANISER_ACTION_NAMES = tuple(a.value for a in Action if a in ORGANISER_ACTIONS)
