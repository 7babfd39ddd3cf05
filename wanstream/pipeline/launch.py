"""Starting the ranks: spawned on this machine (loopback rendezvous on a free port) or under ``torchrun``.

Spawn mode: the calling process is rank 0 and hosts the rendezvous store (a ``TCPStore`` on 127.0.0.1, port
chosen by the OS); ranks 1 .. W-1 are ``spawn``-ed child processes that connect to it. Under ``torchrun`` every
rank is started by torchrun and connects to its agent's store (``MASTER_ADDR`` / ``MASTER_PORT``).

Every rank: connect to the store → heartbeat → load its part of the model (:func:`load_rank`) → announce
``up/<rank>`` → create the process groups → serve (:class:`~.worker.Worker`). Rank 0 waits until every rank is up
(:func:`wait_up`) and joins the spawned ranks at the end (:func:`reap`). A worker that fails reports the error in
the store (so the others can name it) and exits with a non-zero code; :func:`worker_main` never returns into
library code, it ends the process. Imports ``models`` (the loader), :mod:`.health`, :mod:`.transport` and, for a
worker, :mod:`.stage` / :mod:`.worker`; never the driver.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from wanstream.pipeline.health import Health, PipelineError
from wanstream.pipeline.transport import Transport

log = logging.getLogger("wanstream.pipeline")

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LaunchSpec:
    """Everything a worker rank needs to start (picklable: it crosses the spawn boundary)."""

    model: str
    devices: list[str]
    split: list[tuple[int, int]]
    dtype: str | None = None              # None: bf16 on CUDA, fp32 on CPU
    decode: str = "vae"                   # what the last rank loads: vae | taehv | none
    timeout: float = 120.0                # no progress for this long → the stuck rank is named, all stop
    dead_after: float = 10.0              # no heartbeat for this long → the rank is reported dead
    startup_timeout: float = 900.0
    poll: float = 0.2
    max_outstanding: int = 2
    threads: int | None = None            # torch CPU threads per worker rank
    prefix: str = field(default_factory=lambda: f"wanstream/{uuid.uuid4().hex[:10]}/")
    hostname: str | None = "127.0.0.1"    # gloo interface (None: the default one, for multi-node torchrun)
    log_level: int = logging.WARNING
    fault: str | None = None              # tests only: "hang:<rank>:<call>" makes that rank stall at that call

    @property
    def world(self) -> int:
        return len(self.devices)

    def torch_dtype(self) -> torch.dtype | None:
        return DTYPE_NAMES[self.dtype] if self.dtype else None


def load_rank(spec: LaunchSpec, rank: int, *, vae: bool = False, text_encoder: bool = False,
              taehv: bool = False):
    """Rank ``rank``'s share of the model (the loader's part filter): its blocks, the patch embedding on rank 0,
    the head on the last rank, and the VAE / text encoder / TAEHV it asks for."""
    from wanstream.models.checkpoints import DitPart
    from wanstream.models.loader import load_model
    part = DitPart(range(*spec.split[rank]), patch_embedding=rank == 0, head=rank == spec.world - 1)
    return load_model(spec.model, spec.devices[rank], spec.torch_dtype(), text_encoder=text_encoder, taehv=taehv,
                      vae=vae, part=part)


def check_devices(devices) -> None:
    """Every rank's device must exist here (CUDA ranks: one GPU each)."""
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if cuda and not torch.cuda.is_available():
        raise ValueError("the pipeline was asked for CUDA devices but this machine has none "
                         "(use --pipeline N --device cpu for CPU ranks)")
    count = torch.cuda.device_count() if cuda else 0
    for d in cuda:
        if (d.index or 0) >= count:
            raise ValueError(f"{d}: this machine has {count} CUDA device(s)")
    if len(set(map(str, cuda))) != len(cuda):
        raise ValueError(f"each CUDA rank needs its own GPU, got {list(map(str, devices))}")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def connect(host: str, port: int, prefix: str, timeout: float, master: bool = False):
    store = dist.TCPStore(host, port, None, master, timeout=_timedelta(timeout), wait_for_workers=False)
    return dist.PrefixStore(prefix, store), store


def host_store(spec: LaunchSpec, host: str = "127.0.0.1"):
    """Rank 0 in spawn mode: a store on a port picked by the OS."""
    raw = dist.TCPStore(host, 0, None, True, timeout=_timedelta(spec.startup_timeout), wait_for_workers=False)
    return dist.PrefixStore(spec.prefix, raw), raw, host, raw.port


def spawn_workers(spec: LaunchSpec, host: str, port: int) -> list:
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, spec.world):
        p = ctx.Process(target=worker_main, args=(rank, host, port, spec), name=f"wanstream-rank{rank}",
                        daemon=False)
        p.start()
        procs.append(p)
    return procs


def torchrun_env() -> dict | None:
    """``{rank, world, local_rank, host, port}`` when running under torchrun with WORLD_SIZE >= 2."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
        return None
    world = int(env["WORLD_SIZE"])
    if world < 2:
        return None
    return dict(rank=int(env["RANK"]), world=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                host=env["MASTER_ADDR"], port=int(env["MASTER_PORT"]),
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True",
                run_id=env.get("TORCHELASTIC_RUN_ID", "run"))


def setup_rank(rank: int, spec: LaunchSpec, store, factory, on_store_lost=None) -> Health:
    health = Health(store, rank, spec.world, dead_after=spec.dead_after, store_factory=factory,
                    on_store_lost=on_store_lost)
    health.start()
    return health


def make_transport(rank: int, spec: LaunchSpec, store, health: Health) -> Transport:
    device = torch.device(spec.devices[rank])
    return Transport(rank, spec.world, store, device, health, timeout=spec.timeout, poll=spec.poll,
                     max_outstanding=spec.max_outstanding, hostname=spec.hostname)


def _hard_exit(message: str) -> None:
    print(f"wanstream pipeline: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def worker_main(rank: int, host: str, port: int, spec: LaunchSpec, master: bool = False) -> None:
    """Entry point of ranks 1 .. W-1 (spawned, or under torchrun). Ends the process."""
    code = run_worker(rank, host, port, spec, master)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_worker(rank: int, host: str, port: int, spec: LaunchSpec, master: bool = False) -> int:
    from wanstream.pipeline.stage import Stage
    from wanstream.pipeline.worker import Worker
    logging.basicConfig(level=spec.log_level, format=f"[rank {rank}] %(message)s")
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # rank 0 / torchrun decide; SIGTERM ends us
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    except ValueError:
        pass
    if spec.threads:
        torch.set_num_threads(spec.threads)
    health = None
    try:
        store, _raw = connect(host, port, spec.prefix, spec.startup_timeout, master)
        factory = lambda: connect(host, port, spec.prefix, spec.startup_timeout)[0]  # noqa: E731
        health = setup_rank(rank, spec, store, factory, on_store_lost=_hard_exit)
        device = torch.device(spec.devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        last = rank == spec.world - 1
        health.mark("loading")
        model = load_rank(spec, rank, vae=last and spec.decode == "vae", taehv=last and spec.decode == "taehv")
        store.set(f"up/{rank}", "1")
        health.mark("connecting")
        transport = make_transport(rank, spec, store, health)
        stage = Stage(model, rank, spec.world, spec.split)
        health.mark("ready")
        with torch.no_grad():
            Worker(stage, transport, health, spec.fault).serve()
        store.set(f"mem/{rank}", str(stage.memory_bytes()))
        transport.close()
        health.exited("ok")
        return 0
    except PipelineError as exc:
        msg = str(exc)
        print(f"wanstream pipeline rank {rank}: error: {msg}", file=sys.stderr, flush=True)
        if health:
            health.report(msg, exc.rank)
            health.exited("error")
        return 1
    except KeyboardInterrupt:
        if health:
            health.report(f"rank {rank} was interrupted", rank)
            health.exited("interrupted")
        return 130
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
        msg = f"rank {rank} failed: {type(exc).__name__}: {exc}"
        print(f"wanstream pipeline rank {rank}: error: {msg}", file=sys.stderr, flush=True)
        traceback.print_exc()
        if health:
            health.report(msg, rank)
            health.exited("error")
        return 1


def wait_up(store, spec: LaunchSpec, health, procs) -> None:
    """Wait until every rank has loaded its stage, watching the spawned processes and reported errors."""
    deadline = time.monotonic() + spec.startup_timeout
    while True:
        missing = [r for r in range(spec.world) if not store.check([f"up/{r}"])]
        if not missing:
            return
        for r, p in enumerate(procs, start=1):
            if p.exitcode is not None:
                errs = {e[0]: e[2] for e in health.errors()}
                raise PipelineError(errs.get(r, f"rank {r} exited during startup (exit code {p.exitcode})"), r)
        errs = health.errors()
        if errs:
            raise PipelineError(errs[0][2], errs[0][1])
        if time.monotonic() > deadline:
            raise PipelineError(f"ranks {missing} did not start within {spec.startup_timeout:.0f} s", missing[0])
        time.sleep(spec.poll)


def reap(procs, wait: float) -> None:
    """Join the spawned ranks; terminate, then kill, any that is still there after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():   # stuck or stopped: it had its chance to exit on its own
            p.kill()
            p.join(5.0)
