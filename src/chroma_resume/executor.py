"""Where the model runs: in this process (`local`) or in a pool of Ray actors (`ray`).

The pipeline hands an executor the texts of one batch (`submit`) and later asks for their
vectors (`.result()` of what submit returned), in batch order; it keeps at most
`in_flight` batches submitted and not yet written. Everything else, the scan, the plan,
the chunking, the cache, the upserts and the WAL, stays in the one writer process, so a
cluster changes where vectors are computed and nothing about what is committed or when.

`local` is the model on one worker thread, one batch ahead of the writer. `ray` imports
Ray only when chosen (the local path never does) and starts one actor per worker, each
loading the model once. Every result carries its batch number and the worker's model
fingerprint, dimension and precision, and is refused when the fingerprint or dimension are not
the writer's: a node with another model or another revision would otherwise mix vector spaces
in one collection. Precision is not refused: each worker runs the fastest path its own machine
checked (fp16 on a GPU, bf16 on a CPU with bfloat16 units, else float32), and every such path is
within the probe check's tolerance of float32, so workers of different precisions serve one build. A worker that dies (actor killed, node lost) costs a re-submission of
its batches to a live or a replacement actor; embedding is pure and the ids are known
before it, so a batch computed twice is still written once.
"""
from __future__ import annotations

import math
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import numpy as np

from . import embedders, failpoints, models
from .embedders import OnPass
from .config import Config
from .errors import Interrupted, ModelLoadError, RuntimeFailure, UsageError
from .reporting import Warnings

RAY_EXTRA = "pip install 'chroma-resume[ray]'"
LOCAL_IN_FLIGHT = 1  # the writer writes batch N while the model computes batch N+1
RAY_IN_FLIGHT_PER_WORKER = 2  # one computing, one queued on each actor: no actor idles between batches
CONNECT_TIMEOUT = 5.0  # seconds: a Ray GCS address that does not answer a TCP connect in time is down
ACTOR_START_TIMEOUT = 600.0  # seconds an actor may take to be placed and load its model (a cold node, a big model)
WAIT_POLL = 0.5  # seconds between looks at the stop signal while waiting on an actor


def in_flight(c: Config) -> int:
    """Batches submitted and not yet written, at most: each holds its texts and vectors in memory."""
    if c.max_batches_in_flight:
        return c.max_batches_in_flight
    return LOCAL_IN_FLIGHT if c.executor == "local" else RAY_IN_FLIGHT_PER_WORKER * c.ray_workers


def connect(c: Config) -> None:
    """Reach the cluster before anything is written: Ray missing is exit 2 naming the extra, a
    cluster that cannot be reached is exit 5. A no-op for the local executor (imports nothing)."""
    if c.executor != "ray":
        return
    if c.ray_gpus_per_worker and not c.device.startswith("cuda"):
        raise UsageError(f"--ray-gpus-per-worker {c.ray_gpus_per_worker} needs --device cuda (the workers load the "
                         f"model on the GPU Ray gives them; --device {c.device} would leave it idle)")
    ray = _import_ray()
    if ray.is_initialized():
        return
    address = None if c.ray_address == "local" else c.ray_address
    if address and address != "auto":
        _reachable(address)
    try:
        ray.init(address=address, num_cpus=_local_cpus(c) if address is None else None,
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=False,
                 runtime_env={"py_modules": [os.path.dirname(os.path.abspath(__file__))]})
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        raise RuntimeFailure(f"--ray-address {c.ray_address}: cannot reach a Ray cluster ({exc}); start one with "
                             f"`ray start --head` or give its address (a cluster with token authentication also "
                             f"needs RAY_AUTH_MODE=token here, or --ray-address auto on one of its nodes)") from None
    have = ray.cluster_resources()
    for option, resource, need in (("--ray-cpus-per-worker", "CPU", c.ray_cpus_per_worker),
                                   ("--ray-gpus-per-worker", "GPU", c.ray_gpus_per_worker)):
        if need > have.get(resource, 0):  # an actor no node can hold would wait forever
            raise UsageError(f"{option} {need:g}: the Ray cluster has {have.get(resource, 0):g} {resource}s in all")
        if c.ray_workers * need > have.get(resource, 0):  # so would the actors past what the cluster holds
            raise UsageError(f"--ray-workers {c.ray_workers} {option} {need:g} reserve "
                             f"{c.ray_workers * need:g} {resource}s, the Ray cluster has {have.get(resource, 0):g} "
                             f"{resource}s in all: fewer workers or less per worker")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _local_cpus(c: Config) -> int:
    """Enough for every worker's reservation (5 x 0.5 is 3 CPUs, never round()'s 2)."""
    return max(1, math.ceil(c.ray_workers * c.ray_cpus_per_worker - 1e-9))


def _reachable(address: str) -> None:
    """ray.init waits minutes on an address where nothing listens; a TCP connect tells at once."""
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise RuntimeFailure(f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({exc}); start one "
                             f"with `ray start --head` or give its address") from None


def start(c: Config, fingerprint: str, warn: Warnings, should_stop=lambda: False):
    """The executor this config names; the model (or the actors) are loaded on the first submit.
    should_stop: whether the run was asked to stop (SIGINT/SIGTERM), looked at while waiting on Ray."""
    if c.executor == "ray":
        return RayExecutor(c, fingerprint, warn, should_stop)
    return LocalExecutor(c, warn)


class LocalExecutor:
    """The model in this process, on one worker thread, loaded on the first miss."""

    def __init__(self, c: Config, warn: Warnings):
        self.c, self.warn = c, warn
        self.model = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    def submit(self, texts: list[str], on_pass: OnPass | None = None) -> Future:
        """on_pass(n) is called from the worker thread after each forward pass."""
        return self.pool.submit(self._encode, texts, on_pass)

    def _encode(self, texts: list[str], on_pass: OnPass | None) -> np.ndarray:
        if self.model is None:
            self.model = embedders.load(self.c, self.warn)
        return np.asarray(self.model.encode(texts, on_pass), dtype=np.float32)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---- Ray ---------------------------------------------------------------------------------

class Identity(msgspec.Struct, frozen=True):
    """What a worker computes vectors with, sent with every result. `precision` (float32, bf16,
    fp16) is reported, not compared: trusted precisions are one schema (embedders/probe.py)."""
    fingerprint: str
    dim: int
    node: str
    precision: str = "float32"


def checked(identity: Identity, fingerprint: str, dim: int | None) -> int:
    """The dimension of vectors this writer accepts from a worker: only its own model's, and one
    dimension per build. Anything else is refused (exit 2) before a vector of it is written."""
    if identity.fingerprint != fingerprint:
        raise ModelLoadError(f"Ray worker on {identity.node} computes vectors with model {identity.fingerprint}, "
                             f"this build with {fingerprint}: install the same model (files, revision) on every "
                             f"node")
    if dim is not None and identity.dim != dim:
        raise ModelLoadError(f"Ray worker on {identity.node} returns {identity.dim}-d vectors, the others {dim}-d: "
                             f"refused")
    return identity.dim


class EmbedWorker:
    """The body of one Ray actor: the model loaded once, texts in, tagged float32 rows out."""

    def __init__(self, config: bytes):
        c = msgspec.json.decode(config, type=Config)
        self.error: ModelLoadError | None = None
        try:
            self.model = embedders.load(c)
        except ModelLoadError as exc:  # raised here it would reach the writer as a bare "actor died"
            self.error = exc
            return
        probe = np.asarray(self.model.encode(["dimension probe"]), dtype=np.float32)
        self.identity = Identity(models.model_fingerprint(c), int(probe.shape[1]), socket.gethostname(),
                                 self.model.precision)

    def who(self) -> Identity:
        if self.error:
            raise ModelLoadError(f"on {socket.gethostname()}: {self.error}")
        return self.identity

    def encode(self, batch_no: int, texts: list[str]) -> tuple[int, Identity, np.ndarray]:
        return batch_no, self.identity, np.asarray(self.model.encode(texts), dtype=np.float32)


class RayExecutor:
    """A pool of `--ray-workers` actors; batches go to the least busy live one. Results are
    checked against the writer's model fingerprint and the first dimension seen."""

    MAX_LOSSES_PER_WORKER = 3  # then the cluster is not healthy enough to finish: exit 5, resume later

    def __init__(self, c: Config, fingerprint: str, warn: Warnings, should_stop=lambda: False):
        connect(c)
        import ray

        self.ray, self.c, self.fingerprint, self.warn, self.should_stop = ray, c, fingerprint, warn, should_stop
        # The workers run elsewhere: give them absolute paths, the writer's working folder means nothing there.
        self.config = msgspec.json.encode(msgspec.structs.replace(c, root=os.path.abspath(c.root)))
        self.actor_class = ray.remote(num_cpus=c.ray_cpus_per_worker, num_gpus=c.ray_gpus_per_worker,
                                      max_restarts=0)(EmbedWorker)
        self.busy: dict = {}  # live actor -> batches submitted to it and not yet returned
        self.dim: int | None = None
        self.batch_no = 0
        self.losses = 0

    def submit(self, texts: list[str], on_pass: OnPass | None = None) -> "RayBatch":
        """on_pass(len(texts)) once the batch's vectors are back (an actor's passes are not seen here)."""
        if not self.busy:
            self._start_actors(self.c.ray_workers)
        self.batch_no += 1
        batch = RayBatch(self, self.batch_no, texts, on_pass)
        self._send(batch)
        return batch

    def _start_actors(self, n: int) -> None:
        """Start n actors and wait until each has loaded its model; a worker that cannot load it
        (or loads another one) stops the run before its first vector is used."""
        actors = [self.actor_class.remote(self.config) for _ in range(n)]
        for actor in actors:
            try:
                identity = self.wait(actor.who.remote(), ACTOR_START_TIMEOUT, "a Ray worker to start")
            except self.ray.exceptions.RayTaskError as exc:
                raise ModelLoadError(f"a Ray worker cannot load the model {exc.cause}") from None
            except self.ray.exceptions.RayActorError as exc:
                raise RuntimeFailure(f"a Ray worker did not start: {exc}") from None
            self.dim = checked(identity, self.fingerprint, self.dim)
            self.busy[actor] = 0

    def wait(self, ref, limit: float | None, what: str):
        """ray.get, in short waits: the stop signal is honoured between them (ray.get alone blocks
        SIGTERM's handler), and `limit` bounds the whole wait (an actor no node can place waits forever)."""
        began = time.monotonic()
        while True:
            try:
                return self.ray.get(ref, timeout=WAIT_POLL)
            except self.ray.exceptions.GetTimeoutError:
                pass
            if self.should_stop():
                raise Interrupted(f"interrupted while waiting for {what}: nothing of it was written; the WAL is "
                                  f"intact, rerun to resume")
            if limit is not None and time.monotonic() - began > limit:
                raise RuntimeFailure(f"waited {limit:g}s for {what} (--ray-workers {self.c.ray_workers}, "
                                     f"--ray-cpus-per-worker {self.c.ray_cpus_per_worker:g}): the cluster cannot "
                                     f"place it; the WAL is intact, rerun to resume")

    def _send(self, batch: "RayBatch") -> None:
        actor = min(self.busy, key=self.busy.get)
        self.busy[actor] += 1
        batch.actor, batch.ref = actor, actor.encode.remote(batch.batch_no, batch.texts)

    def _lost(self, batch: "RayBatch", exc: Exception) -> None:
        """Drop the dead actor, start a replacement, and send the batch again."""
        if batch.actor in self.busy:  # the first of its batches to report the loss
            self.losses += 1
            del self.busy[batch.actor]
            self.warn("embed_worker_lost", batch=batch.batch_no, cause=type(exc).__name__)
        if self.losses > self.MAX_LOSSES_PER_WORKER * self.c.ray_workers:
            raise RuntimeFailure(f"lost {self.losses} Ray workers in this build (last: {exc}); the WAL is intact, "
                                 f"rerun to resume once the cluster is healthy") from None
        if len(self.busy) < self.c.ray_workers:
            self._start_actors(self.c.ray_workers - len(self.busy))
        self._send(batch)

    def kill_one(self) -> None:
        """Fault injection: kill the actor holding the most batches, as a lost node would."""
        self.ray.kill(max(self.busy, key=self.busy.get), no_restart=True)

    def close(self) -> None:
        for actor in list(self.busy):
            self.ray.kill(actor, no_restart=True)
        self.busy.clear()
        if self.c.ray_address == "local":  # the cluster this driver started: its workers end with it
            self.ray.shutdown()


class RayBatch:
    """One batch on its way through an actor; `.result()` waits, re-submits after a lost worker,
    and refuses vectors that are not this batch's or not this model's."""

    def __init__(self, pool: RayExecutor, batch_no: int, texts: list[str], on_pass: OnPass | None = None):
        self.pool, self.batch_no, self.texts, self.on_pass = pool, batch_no, texts, on_pass
        self.actor = self.ref = None

    def result(self) -> np.ndarray:
        ray = self.pool.ray
        while True:
            try:
                batch_no, identity, vectors = self.pool.wait(self.ref, None, f"batch {self.batch_no}")
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                self.pool._lost(self, exc)
                continue
            except ray.exceptions.RayTaskError as exc:  # the model failed on these texts (out of memory, ...)
                raise RuntimeFailure(f"Ray worker failed on batch {self.batch_no}: {exc.cause!r}; the WAL is intact, "
                                     f"rerun to resume") from None
            break
        if self.actor in self.pool.busy:
            self.pool.busy[self.actor] -= 1
        if failpoints.fire("executor.returned") == "on":
            self.pool.kill_one()
        checked(identity, self.pool.fingerprint, self.pool.dim)
        if batch_no != self.batch_no or vectors.shape != (len(self.texts), self.pool.dim):
            raise RuntimeFailure(f"Ray worker on {identity.node} answered batch {self.batch_no} with batch {batch_no} "
                                 f"of shape {vectors.shape}: refused")
        if self.on_pass:
            self.on_pass(len(self.texts))
        return vectors
