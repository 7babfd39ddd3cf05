"""MIDI inputs and Ableton Link for the live hub (``serve --midi PORT`` / ``--midi all`` / ``--link``).

:class:`MidiInputs` opens the named MIDI input ports with mido (the python-rtmidi backend: ALSA sequencer on
Linux, CoreMIDI, Windows MM) and reads each on its own thread; every message goes to
:meth:`LiveHub.midi <wanstream.server.live.LiveHub.midi>` (CC values, notes, clock, learn, note slots). Any mido
input port works, so tests drive the same path with an in-memory port (``mido.ports.EchoPort``). A port has a
token bucket (``midi_rate`` / ``midi_burst``): a controller that floods is cut to the rate, counted in
``wanstream_live_midi_dropped_total``, and the streams see only the latest values, so a broken controller
costs the server one thread's work and no stream more than its own parameters.

:class:`LinkTempo` (optional, the ``aalink`` package: ``pip install wanstream[link]``) joins the Ableton Link
session on the local network and re-anchors the hub's tempo from it every ``LINK_POLL_S``; Link then wins over
MIDI clock. Link finds its peers by multicast on the local network: it is off unless ``--link`` is given.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from wanstream.server.session import TokenBucket

log = logging.getLogger("wanstream.server.midi")

LINK_POLL_S = 0.02


def available() -> str | None:
    """None when MIDI ports can be opened here, else why not."""
    try:
        import mido
    except ImportError:
        return "the mido package is not installed (pip install 'wanstream[midi]')"
    try:
        mido.get_input_names()
    except Exception as exc:  # noqa: BLE001 - no backend (python-rtmidi) or no ALSA sequencer
        return f"no MIDI backend: {type(exc).__name__}: {str(exc)[:200]}"
    return None


class MidiInputs:
    """The server's MIDI input ports, each read on its own thread (see the module docstring)."""

    def __init__(self, hub):
        self.hub = hub
        self.settings = hub.settings
        self.ports: list = []
        self._threads: list[threading.Thread] = []

    def open(self, names: list[str]) -> list[str]:
        """Open ``names`` (``["*"]``: every input port); OSError naming the port and the ports there are."""
        import mido
        try:
            there = mido.get_input_names()
        except Exception as exc:  # noqa: BLE001
            raise OSError(f"cannot open MIDI inputs: {type(exc).__name__}: {exc}") from None
        wanted = there if names == ["*"] else names
        for name in wanted:
            if name not in there:
                raise OSError(f"no MIDI input {name!r} (inputs here: {', '.join(there) or 'none'})")
        for name in wanted:
            self.attach(mido.open_input(name), name)
        return wanted

    def attach(self, port, name: str | None = None) -> None:
        """Read ``port`` (any mido input port) on a thread until it closes or :meth:`close`."""
        name = name or getattr(port, "name", None) or f"port {len(self.ports)}"
        self.ports.append(port)
        self.hub.midi_ports.append(name)
        thread = threading.Thread(target=self._read, args=(port, name), name=f"wanstream-midi-{len(self.ports)}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()
        log.info("MIDI input %r open", name)

    def _read(self, port, name: str) -> None:
        bucket = TokenBucket(self.settings.midi_rate, self.settings.midi_burst, self.hub.clock)
        while True:
            try:
                msg = port.receive()
            except (OSError, ValueError, EOFError):
                break                                       # the port was closed (here or by its device)
            except Exception as exc:  # noqa: BLE001 - a broken port ends its own thread, nothing else
                log.warning("MIDI input %r: %s: %.120s", name, type(exc).__name__, exc)
                break
            if msg is None:
                continue
            if not bucket.take():
                self.hub.counters.add("midi_dropped")
                continue
            try:
                self.hub.midi(msg)
            except Exception as exc:  # noqa: BLE001 - one message must never end the port's thread
                log.warning("MIDI message %s dropped: %s: %.120s", msg.type, type(exc).__name__, exc)
        log.info("MIDI input %r closed", name)

    def close(self) -> None:
        for port in self.ports:
            try:
                port.close()
            except Exception:  # noqa: BLE001
                pass
        for thread in self._threads:
            thread.join(5)
        self.ports.clear()
        self._threads.clear()
        self.hub.midi_ports.clear()


class LinkTempo:
    """The hub's tempo follows an Ableton Link session (see the module docstring)."""

    def __init__(self, hub):
        import aalink  # ImportError: the caller says how to install it
        self.hub = hub
        self._aalink = aalink
        self.link = None
        self._task: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.link = self._aalink.Link(self.hub.tempo.bpm, loop)
        self.link.quantum = self.hub.tempo.beats_per_bar
        self.link.enabled = True
        self.hub.link = self
        self.hub.tempo.source = "link"
        self._task = loop.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            self.hub.tempo.anchor(self.hub.clock(), float(self.link.beat), float(self.link.tempo))
            await asyncio.sleep(LINK_POLL_S)

    def status(self) -> dict:
        return {"peers": int(self.link.num_peers) if self.link is not None else 0}

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.link is not None:
            self.link.enabled = False
        self.hub.link = None
