"""`crucible-record view RUN`: a live page of any run, served by Bokeh (the ``[view]`` extra).

follow.py keeps what the page shows up to date in a thread (statistics per stored block, projection
bases, the experiment's panels); page.py is one tab's Bokeh document; :func:`serve` runs the server
in this process until Ctrl-C. Bokeh is imported only here, when a page is served.
"""

from __future__ import annotations

import threading
import webbrowser
from collections.abc import Callable
from functools import partial

from ..errors import CrucibleError
from .follow import Follower, Panels


def serve(where: str, *, port: int = 5006, host: str = "127.0.0.1", browser: bool = True, training: bool = False,
          panels: Callable | None = None, say: Callable[[str], None] = print) -> None:
    """Serve the live page of the run at `where` on host:port until interrupted (KeyboardInterrupt
    propagates, after the server and its follower are stopped). `training`, `panels`: see Follower."""
    try:
        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.server import Server
    except ImportError:
        raise CrucibleError("the view needs Bokeh: pip install 'crucible-record[view]'") from None
    from .page import document

    wildcard = host in ("0.0.0.0", "::", "")
    named = f"[{host}]" if ":" in host else host  # an IPv6 address is bracketed in URLs and Host headers
    origins = [f"*:{port}"] if wildcard else [f"{named}:{port}"] + ([f"localhost:{port}"] if host == "127.0.0.1" else [])
    follower = Follower(where, training=training, panels=panels)
    try:
        server = Server({"/": Application(FunctionHandler(partial(document, follower=follower)))},
                        port=port, address=host, allow_websocket_origin=origins)
    except OSError as e:
        raise CrucibleError(f"cannot serve on {host}:{port}: {e.strerror or e} (choose another --port)") from None
    follower.start()
    server.start()
    shown = "[::1]" if host == "::" else "127.0.0.1" if wildcard else named
    url = f"http://{shown}:{server.port}/"
    say(f"Serving {where} at {url} (Ctrl-C stops)" + (f"; bound to {host}: visible to your network" if wildcard else ""))
    if browser:  # in a thread: on a machine without a display, webbrowser may run a console browser and wait
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    try:
        server.io_loop.start()
    finally:
        follower.stop()
        server.stop()


__all__ = ["Follower", "Panels", "serve"]
