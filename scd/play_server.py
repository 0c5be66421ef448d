"""The `scd play` web server (aiohttp): the page, and one WebSocket per viewer.

The server runs its event loop in a thread of its own, so the caller keeps the main thread (and
Ctrl-C); the play's panels start with the first page that connects. Frames reach each viewer
through a one-frame slot per panel: a newer frame replaces an
unsent one, and a viewer is sent a panel's frame only while it has fewer than `CREDIT` frames of
that panel not yet acknowledged as shown, so a slow or hidden tab drops frames instead of queueing
them. Only pages from the server's own origin may open the socket, and on a loopback address only
requests naming a loopback host are served (no DNS rebinding).

Wire format, server to page: JSON text messages ({"type": "state", ...}, {"type": "error", ...}) and
binary frame messages: a 4-byte big-endian header length, a JSON header, then the PNG.
Page to server: JSON text {"type": "press"|"release", "action": i}, {"type": "ack", "panel": p},
{"type": "pause", "paused": bool}, {"type": "pace", "paced": bool}, {"type": "reset"}, {"type": "seed"};
a field of another type (1.0 for an int, "false" for a bool) closes the socket (code 1003).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import socket
import struct
import threading
import time
from pathlib import Path

from aiohttp import WSMsgType, web

from scd.checkpoints import load_model
from scd.errors import ConfigError, ServerError
from scd.play import PanelFrame, Session, matched_baseline

PAGE = Path(__file__).parent / "assets" / "play"
FILES = {"/": ("index.html", "text/html"), "/play.js": ("play.js", "text/javascript"),
         "/play.css": ("play.css", "text/css")}
CREDIT = 2  # frames of a panel in flight to one viewer
MAX_VIEWERS = 8
MAX_MESSAGE = 1024  # bytes: the page only sends small commands
LINGER_S = 3.0  # after the last viewer leaves, wait this long for a reload before ending the play
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; connect-src 'self'; "
                                      "frame-ancestors 'none'"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def frame_message(frame: PanelFrame, dropped: int) -> bytes:
    header = json.dumps({"panel": frame.panel, "episode": frame.episode, "index": frame.index, "action": frame.action,
                         "latency_ms": round(frame.latency_ms, 2), "p50_ms": round(frame.p50_ms, 2),
                         "fps": round(frame.fps, 2), "target_fps": frame.target_fps, "paced": frame.paced,
                         "behind": frame.behind, "dropped": dropped}).encode()
    return struct.pack(">I", len(header)) + header + frame.png


class Viewer:
    """One open page: its newest unsent frame and its credit, per panel."""

    def __init__(self, panels: int):
        self.latest: list[PanelFrame | None] = [None] * panels
        self.credit = [CREDIT] * panels
        self.dropped = [0] * panels
        self.state: dict | None = None
        self.ready = asyncio.Event()

    def offer(self, frame: PanelFrame) -> None:
        if self.latest[frame.panel] is not None:
            self.dropped[frame.panel] += 1
        self.latest[frame.panel] = frame
        self.ready.set()

    def offer_state(self, state: dict) -> None:
        self.state = state
        self.ready.set()


class PlayServer:
    """Serves a `Session` at http://host:port/ (port 0: any free port). `start()` binds and starts
    the session, `wait()` blocks until the play ends by itself (the last page closed, or a panel
    failed), `stop()` ends it; safe to call twice. Raises ServerError when the address cannot be used."""

    def __init__(self, session: Session, host: str = "127.0.0.1", port: int = 8765, linger_s: float = LINGER_S):
        if not 0 <= port <= 65535:
            raise ServerError(f"port must be between 0 and 65535, got {port}", parameter="port")
        self.session, self.host, self.port, self.linger_s = session, host, port, linger_s
        self.loopback = is_loopback(host)
        self.url: str | None = None
        self.ended = threading.Event()
        self.viewers_seen = 0
        self._viewers: set[Viewer] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._stopped = False
        self._playing = False

    @property
    def warnings(self) -> list[str]:
        if self.loopback:
            return []
        return [f"listening on {self.host}, not a loopback address: anyone who can reach this machine on port "
                f"{self.port} can watch and drive the model"]

    # ------------------------------------------------------------------ lifecycle (caller's thread)

    def start(self) -> str:
        """Bind and return the page's URL. The session's panels (and its recording) start when the
        first page connects, so a page opened late still sees the play from its first frame."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scd-play-server", daemon=True)
        self._thread.start()
        try:
            self.url = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result()
        except BaseException:
            self._close_loop()
            raise
        self.session.on_frame = self._from_panel(self._offer_frame)
        self.session.on_error = self._from_panel(self._panel_failed)
        return self.url

    @property
    def playing(self) -> bool:
        """Whether the panels have started (a page has connected)."""
        return self._playing

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the play ends by itself (True) or `timeout` seconds pass (False). Wakes
        regularly, so Ctrl-C reaches the caller at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ended.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                return False
        return True

    def stop(self):
        """Stop the panels (closing the recording), close every page's socket, free the port;
        returns the session's recordings."""
        if self._stopped:
            return self.session.recordings
        self._stopped = True
        recordings = self.session.stop()
        if self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            except (TimeoutError, asyncio.TimeoutError, RuntimeError):
                pass
        self._close_loop()
        self.ended.set()
        return recordings

    def _close_loop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()
        self._loop = None

    def _from_panel(self, handler):
        """A callback for the panels' threads: hand the call to the event loop, never block."""
        def call(arg):
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(handler, arg)
                except RuntimeError:  # the loop closed meanwhile: the play is over
                    pass
        return call

    # ------------------------------------------------------------------ the event loop's side

    async def _listen(self) -> str:
        app = web.Application(middlewares=[self._check_host], client_max_size=MAX_MESSAGE)
        app.router.add_get("/ws", self._socket)
        for route in FILES:
            app.router.add_get(route, self._file)
        app.router.add_get("/favicon.ico", self._no_icon)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=False)
        try:
            await site.start()
        except OSError as err:
            await self._runner.cleanup()
            if err.errno == errno.EADDRINUSE:
                raise ServerError(f"port {self.port} on {self.host} is already in use: choose another port "
                                  "(0 picks a free one)", parameter="port") from None
            if isinstance(err, socket.gaierror) or err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise ServerError(f"cannot listen on host {self.host!r}: it is not an address of this machine",
                                  parameter="host") from None
            if err.errno == errno.EACCES:
                raise ServerError(f"no permission to listen on port {self.port}: choose a port above 1023",
                                  parameter="port") from None
            raise ServerError(f"cannot listen on {self.host}:{self.port}: {err.strerror or err}") from None
        self.port = self._runner.addresses[0][1]  # the real port when port 0 was asked for
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}/"

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # closes the sockets with "going away"

    def _allowed_host(self, host: str | None) -> bool:
        """On a loopback address only loopback names are served: a page of another site that rebinds
        its name to 127.0.0.1 sends its own name as Host and is refused."""
        if not host:
            return False
        if not self.loopback:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name) and host.endswith(f":{self.port}")

    @web.middleware
    async def _check_host(self, request: web.Request, handler):
        if not self._allowed_host(request.host):
            return web.Response(status=403, text="forbidden host\n")
        return await handler(request)

    async def _file(self, request: web.Request) -> web.Response:
        name, content_type = FILES[request.path]
        return web.Response(body=(PAGE / name).read_bytes(), content_type=content_type, headers=HEADERS)

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=HEADERS)  # no icon, and no 404 in the browser's console

    def _origin_ok(self, request: web.Request) -> bool:
        """A WebSocket may only come from a page this server served."""
        return request.headers.get("Origin") == f"http://{request.host}"

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        if not self._origin_ok(request):
            return web.Response(status=403, text="forbidden origin: open the page this server serves\n")
        if len(self._viewers) >= MAX_VIEWERS:
            return web.Response(status=503, text="too many viewers\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=20.0)
        await ws.prepare(request)
        viewer = Viewer(len(self.session.panels))
        self._viewers.add(viewer)
        self.viewers_seen += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        viewer.offer_state(self._state())
        if not self._playing and not self._stopped:  # the first page: the panels and the recording start now
            self._playing = True
            self.session.start()
        sender = asyncio.create_task(self._send(ws, viewer))
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    break  # the page sends only text
                if not self._command(viewer, message.data):
                    await ws.close(code=1003, message=b"malformed command")  # 1003: data it cannot accept
                    break
        finally:
            sender.cancel()
            self._viewers.discard(viewer)
            if not self._viewers:
                self.session.release()  # nobody holds a key any more
                self._linger = asyncio.get_running_loop().call_later(self.linger_s, self._last_left)
        return ws

    async def _send(self, ws: web.WebSocketResponse, viewer: Viewer) -> None:
        try:
            while not ws.closed:
                await viewer.ready.wait()
                viewer.ready.clear()
                if viewer.state is not None:
                    state, viewer.state = viewer.state, None
                    await ws.send_str(json.dumps(state))
                for panel, frame in enumerate(viewer.latest):
                    if frame is not None and viewer.credit[panel] > 0:
                        viewer.latest[panel] = None
                        viewer.credit[panel] -= 1
                        await ws.send_bytes(frame_message(frame, viewer.dropped[panel]))
        except (ConnectionError, RuntimeError):
            pass  # the page went away mid-send

    def _command(self, viewer: Viewer, text: str) -> bool:
        """Apply one command from a page (the page is not trusted): every field must have its type
        (an int is an int, not 1.0 or True; a bool is true or false, not "false"). Returns False for a
        malformed one, whose socket is then closed; an unknown type is ignored, for newer pages."""
        try:
            command = json.loads(text)
        except ValueError:
            return False
        if not isinstance(command, dict) or not isinstance(command.get("type"), str):
            return False
        kind, session = command["type"], self.session
        fields = {"ack": ("panel", int, True), "press": ("action", int, True), "release": ("action", int, False),
                  "pause": ("paused", bool, False), "pace": ("paced", bool, False)}
        if kind in fields:
            name, kind_of, required = fields[kind]
            value = command.get(name)
            if (value is None and required) or (value is not None and type(value) is not kind_of):
                return False
        if kind == "ack":
            if not 0 <= command["panel"] < len(viewer.credit):
                return False
            viewer.credit[command["panel"]] = min(CREDIT, viewer.credit[command["panel"]] + 1)
            viewer.ready.set()
            return True
        if kind == "press":
            session.press(command["action"])
        elif kind == "release":
            session.release(command.get("action"))
        elif kind == "pause":
            paused = command.get("paused")
            session.pause(not session.controls.paused if paused is None else paused)
        elif kind == "pace":
            paced = command.get("paced")
            session.pace(not session.controls.paced if paced is None else paced)
        elif kind == "reset":
            session.reset()
        elif kind == "seed":
            session.new_seed()
        else:
            return True
        if kind not in ("press", "release"):
            state = self._state()
            for each in self._viewers:
                each.offer_state(state)
        return True

    def _state(self) -> dict:
        return {"type": "state", **self.session.state()}

    def _offer_frame(self, frame: PanelFrame) -> None:
        for viewer in self._viewers:
            viewer.offer(frame)

    def _panel_failed(self, err: BaseException) -> None:
        message = {"type": "error", "message": str(err) or type(err).__name__}
        for viewer in self._viewers:
            viewer.offer_state(message)
        self.ended.set()

    def _last_left(self) -> None:
        self._linger = None
        if not self._viewers:
            self.ended.set()


def open_play(model: str | None = None, host: str = "127.0.0.1", port: int = 8765, compare: bool | None = None,
              prompt: Path | None = None, seed: int = 0, record: Path | None = None, threads: int = 1,
              compiled: bool = False, format_replay=None,
              device: str = "auto", record_frames: Path | None = None,
              samples: int | None = None) -> tuple[PlayServer, list[str]]:
    """Load `model` (and its matched baseline when `compare` is True, or None and it has one), build
    the session and its server, not yet started; returns it with warnings for the user.
    Raises ConfigError when `compare` is True for a model without a matched baseline."""
    loaded = load_model(model)
    baseline = matched_baseline(loaded) if compare is not False else None
    if compare and baseline is None:
        raise ConfigError(f"{loaded.source} has no matched baseline: play it without compare",
                          parameter="compare")
    warnings = []
    if loaded.config.condition != "action":
        warnings.append(f"{loaded.source} takes no actions: the keys do nothing, frames roll forward with the "
                        "null action")
    # the baseline runs the model's own step and sample counts: side by side at equal quality, as `scd bench` compares
    session = Session([loaded] + ([baseline] if baseline is not None else []), prompt=prompt, seed=seed,
                      steps=loaded.config.default_steps, threads=threads, device=device, record=record,
                      compiled=compiled, format_replay=format_replay, record_frames=record_frames,
                      samples=loaded.config.default_samples if samples is None else samples)
    return PlayServer(session, host, port), warnings


__all__ = ["PlayServer", "is_loopback", "open_play"]
