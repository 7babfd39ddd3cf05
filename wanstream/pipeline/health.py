"""The health watch that turns a pipeline failure into a clear error naming the rank that caused it.

Every rank publishes a heartbeat (counter, progress, state) in the rendezvous store from a thread; a rank that
fails writes its error there. A waiting rank polls the store, so a rank that died, was killed or stopped, or
raised, is named in a :class:`PipelineError` within ``dead_after`` seconds; a rank that is alive but makes no
progress is named after ``timeout`` seconds (the wait-for chain is followed to the first rank that is not itself
waiting). Owns the store keys ``hb/``, ``err/`` and ``exit/``; imports nothing of the package (no torch).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

IDLE_STATES = ("idle", "ready")          # published by rank 0 between API calls


class PipelineError(RuntimeError):
    """The pipeline stopped; ``rank`` names the rank that caused it (None when unknown)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


# ------------------------------------------------------------------------------------------------ health
class Health:
    """Heartbeats, error reports and failure diagnosis through the rendezvous store."""

    def __init__(self, store, rank: int, world: int, *, dead_after: float = 10.0, beat: float = 0.25,
                 store_factory: Callable[[], object] | None = None, on_store_lost: Callable[[str], None] | None = None):
        self.store = store
        self.rank = rank
        self.world = world
        self.dead_after = dead_after
        self.beat = beat
        self._factory = store_factory
        self._on_store_lost = on_store_lost
        self.count = 0
        self.progress = 0
        self.state = "starting"
        self._seen: dict[int, tuple[str | None, float, int | None, float]] = {}
        self._exited: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failed: PipelineError | None = None

    # -------------------------------------------------------------- own status
    def _value(self) -> str:
        return f"{self.count}|{self.progress}|{self.state}"

    def start(self) -> None:
        self.store.set(f"hb/{self.rank}", self._value())
        self._thread = threading.Thread(target=self._run, name=f"wanstream-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store = self._factory() if self._factory else self.store
        failing_since = None
        while not self._stop.wait(self.beat):
            self.count += 1
            try:
                store.set(f"hb/{self.rank}", self._value())
                failing_since = None
            except Exception as exc:  # the store host is gone
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.dead_after and self._on_store_lost:
                    self._on_store_lost(f"rank {self.rank}: lost the rendezvous store ({exc}); "
                                        f"the rank hosting it (rank 0 or the launcher) is gone")
                    return

    def mark(self, state: str) -> None:
        self.state = state.replace("|", "/")

    def tick(self) -> None:
        self.progress += 1

    def report(self, message: str, culprit: int | None) -> None:
        """Publish this rank's failure (``culprit``: the rank it blames; itself for its own exception)."""
        try:
            self.store.set(f"err/{self.rank}", f"{-1 if culprit is None else culprit}|{message}")
            self.store.add("nerr", 1)
        except Exception:
            pass

    def exited(self, reason: str = "ok") -> None:
        self._stop.set()
        try:
            self.store.set(f"exit/{self.rank}", reason)
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()

    # -------------------------------------------------------------- others
    def _get(self, key: str) -> str | None:
        if not self.store.check([key]):
            return None
        return self.store.get(key).decode()

    def errors(self) -> list[tuple[int, int | None, str]]:
        """Reported failures: (reporter, culprit, message)."""
        if int(self.store.add("nerr", 0)) == 0:
            return []
        out = []
        for r in range(self.world):
            v = self._get(f"err/{r}") if r != self.rank else None
            if v is not None:
                culprit, _, msg = v.partition("|")
                out.append((r, None if int(culprit) < 0 else int(culprit), msg))
        return out

    def check(self) -> None:
        """Raise :class:`PipelineError` if another rank failed or stopped responding."""
        try:
            errs = self.errors()
        except Exception as exc:
            raise PipelineError(f"lost the rendezvous store ({exc}): rank 0 / the launcher is gone", 0) from None
        if errs:
            own = [e for e in errs if e[1] == e[0]]
            reporter, culprit, msg = (own or errs)[0]
            raise PipelineError(msg, culprit)
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank or r in self._exited:
                continue
            try:
                v = self._get(f"hb/{r}")
            except Exception as exc:
                raise PipelineError(f"lost the rendezvous store ({exc}): rank 0 / the launcher is gone", 0) from None
            if v is None:          # not started yet (startup is watched by the launcher)
                continue
            count, progress, state = (v.split("|", 2) + ["", ""])[:3]
            prev = self._seen.get(r)
            if prev is None or prev[0] != count:
                changed_p = prev[3] if prev and prev[2] == progress else now
                self._seen[r] = (count, now, progress, changed_p)
                continue
            if now - prev[1] > self.dead_after:
                if self._get(f"exit/{r}") is not None:
                    self._exited.add(r)
                    continue
                raise PipelineError(f"rank {r} stopped responding: no heartbeat for {now - prev[1]:.1f} s "
                                    f"(the process died, was killed or is stopped; last state: {state})", r)

    def states(self) -> dict[int, tuple[str, float]]:
        """Each other rank's published state and seconds since its progress counter last changed."""
        now = time.monotonic()
        out = {}
        for r in range(self.world):
            if r == self.rank:
                continue
            try:
                v = self._get(f"hb/{r}")
            except Exception:
                continue
            if v is None:
                continue
            _, progress, state = (v.split("|", 2) + ["", ""])[:3]
            prev = self._seen.get(r)
            if prev is None or prev[2] != progress:
                self._seen[r] = (prev[0] if prev else None, prev[1] if prev else now, progress, now)
                out[r] = (state, 0.0)
            else:
                out[r] = (state, now - prev[3])
        return out

    def diagnose(self, waiting_on: int, waited: float) -> PipelineError | None:
        """Who is stuck: follow 'waiting for rank p' from ``waiting_on`` to a rank that is not waiting.

        None when that rank is idle (rank 0 between API calls: a live stream may pause for any time).
        """
        states = self.states()
        states[self.rank] = (self.state, 0.0)
        chain, r = [], waiting_on
        while r not in chain and r in states:
            chain.append(r)
            state, _ = states[r]
            if not state.startswith("waiting for rank "):
                break
            try:
                r = int(state.split()[3])
            except (IndexError, ValueError):
                break
        else:
            if r in chain:
                return PipelineError(f"deadlock: ranks {chain} wait for each other ({waited:.1f} s)", r)
        state, stale = states.get(r, ("unknown", waited))
        if state in IDLE_STATES:
            return None
        return PipelineError(f"rank {r} made no progress for {max(stale, waited):.1f} s (state: {state}); "
                             f"rank {self.rank} waited {waited:.1f} s for rank {waiting_on}", r)
