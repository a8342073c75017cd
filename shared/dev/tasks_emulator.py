"""Run `gcloud-tasks-emulator` (0.6.2) as a subprocess, for tests and `make dev`.

The emulator pins protobuf<5, so it lives in its own virtual environment (.venv-emulator, built by
`make install`) and is started through that interpreter; the real `google-cloud-tasks` client in
the main venv speaks to it over plaintext gRPC (shared.tasks.build_tasks_client(host)).

What its source (gcloud_tasks_emulator/server.py, __main__.py) does, and what that means here:

- Command line: `python -m gcloud_tasks_emulator start -p PORT -d QUEUE_PATH [-q] [-r N]` (the
  `gcloud-tasks-emulator` script in the same bin dir is the same `main()`). `-d` takes the full path
  `projects/P/locations/L/queues/Q` and may be repeated; `-q` lowers its logging to errors (without
  it, it logs two lines per pending future task every 0.1 s); `-r N` gives up a task after N failed
  attempts (default: never). The listen host is hard-coded to `[::]:PORT` (all interfaces); the
  bootstrap below rewrites it to 127.0.0.1, so the emulator listens on loopback only.
- Dispatch: an HTTP task (`http_request.url`) is requested at its URL exactly as given, with its
  method, headers and body, plus X-CloudTasks-QueueName/-TaskName/-TaskRetryCount/
  -TaskExecutionCount/-TaskETA. `-H/--target-host` and `-t/--target-port` only apply to App Engine
  tasks (`relative_uri`), so no flag is needed to reach the real deliver URL.
- OIDC tokens are ignored: no Authorization header is sent. dispatch_deadline is ignored too: the
  request is made with `urllib.request.urlopen` without a timeout, one task at a time per queue, so
  a handler that hangs (or a URL that black-holes) stalls that whole queue (with the dispatch
  below: takes one of its 10 slots).
- schedule_time is honoured, coarsely: a queue's thread walks all its tasks every 0.1 s, finding
  each by name again, and sends the due ones one at a time, so a task fires up to 0.1 s late on an
  idle queue (p50 0.09 s measured; 0.12 s with 1,200 other tasks pending) and seconds late behind
  a burst of due tasks (13 s behind ~1,000 deferred deliveries due at one instant).
  The bootstrap below replaces that loop (bench/e2e.py measures both; `stock_dispatch=True` keeps
  the package's): a heap by schedule_time woken by each CreateTask, 10 requests in flight (the
  deployed max_concurrent_dispatches), so a task fires within a few ms of its schedule_time.
  Neither applies the queue's rate limits (max_dispatches_per_second).
- Any 4xx/5xx answer or connection error retries the task (~0.1 s later), with no backoff and,
  by default, forever. A 2xx removes it.
- No name deduplication (creating the same name twice gives two deliveries), no DeleteTask, and
  GetQueue of an unknown queue fails with UNKNOWN (a KeyError), not NOT_FOUND. Creating a task in
  an unknown queue fails with FAILED_PRECONDITION. CreateQueue, DeleteQueue (which also stops that
  queue's thread), ListTasks, PurgeQueue and RunTask work.
- State is in memory only; stopping the emulator loses every task.

Two gotchas of its gRPC server, handled by the small bootstrap below rather than by patching it:
grpc's Python server sets SO_REUSEPORT, so a second emulator on a taken port starts "fine" and the
kernel splits connections between the two; and when the port cannot be bound, the API thread dies
but the process keeps running, serving nothing. The bootstrap turns SO_REUSEPORT off and makes a
dead thread end the process, so a port clash is seen at start-up (and a picked port is re-picked).
It also ends the emulator when the process that started it is gone (a killed pytest run or dev
stack would otherwise leave it running in its own session), then calls the emulator's own `main()`
with the usual arguments.

Start-up takes about half a second on these machines, almost all of it imports.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = "CLOUD_TASKS_EMULATOR_PYTHON"
QUEUE_PATH_RE = re.compile(r"^projects/[^/]+/locations/[^/]+/queues/[^/]+$")

READY_MARKER = "tasks-emulator: gRPC server started"
# "stock": the package's own dispatch loop instead of ours (the bench measures both).
DISPATCH_ENV = "MQ_TASKS_EMULATOR_DISPATCH"

_BOOTSTRAP = f"""
import os, sys, threading, time
import grpc

_server = grpc.server

def _exclusive_server(*args, **kwargs):
    options = list(kwargs.pop("options", None) or ())
    options.append(("grpc.so_reuseport", 0))
    server = _server(*args, options=options, **kwargs)
    start = server.start

    def _start():
        start()
        print({READY_MARKER!r}, flush=True)

    server.start = _start
    add_port = server.add_insecure_port
    # The emulator binds [::]:PORT (every interface) whatever it is told; the local stack stays on
    # loopback like everything else it runs.
    server.add_insecure_port = lambda address: add_port(address.replace("[::]", "127.0.0.1", 1))
    return server

grpc.server = _exclusive_server

def _die(args):
    sys.__excepthook__(args.exc_type, args.exc_value, args.exc_traceback)
    sys.stderr.flush()
    os._exit(70)

threading.excepthook = _die

_parent = os.getppid()

def _exit_with_parent():
    while True:
        time.sleep(0.5)
        if os.getppid() != _parent:
            os._exit(0)

threading.Thread(target=_exit_with_parent, daemon=True).start()

# On-time dispatch. The emulator's own loop walks every pending task every 0.1 s and sends the due
# ones one at a time, so a task fires up to 0.1 s late when the queue is idle and seconds late
# behind a burst. Cloud Tasks fires a task at its schedule_time with several requests
# in flight. This replaces the per-queue loop: a heap by schedule_time, woken by each CreateTask,
# and DISPATCHERS requests in flight (the deployed max_concurrent_dispatches). What the emulator
# documents otherwise stays: a 4xx/5xx or connection error retries the task RETRY_DELAY later, -r
# caps the attempts, ListTasks/PurgeQueue/RunTask/DeleteQueue and pausing work on the same list.
import heapq, itertools
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from google.cloud.tasks_v2 import Queue
from gcloud_tasks_emulator import server as _srv

DISPATCHERS = 10
RETRY_DELAY = 0.1
_cond = threading.Condition()
_heaps = {{}}
_seq = itertools.count()


def _due_of(task):
    at = task.schedule_time
    return at.timestamp() if at else 0.0


def _push(queue, task, due):
    heapq.heappush(_heaps.setdefault(queue, []), (due, next(_seq), task))
    _cond.notify_all()


_create_task = _srv.QueueState.create_task


def _create_task_on_time(self, queue, task):
    with _cond:
        task = _create_task(self, queue, task)
        _push(queue, task, _due_of(task))
        return task


_purge_queue = _srv.QueueState.purge_queue


def _purge_queue_on_time(self, queue_name):
    with _cond:
        _heaps.pop(queue_name, None)
        return _purge_queue(self, queue_name)


# Removes the task from the queue's list; False if it is gone (purged, or run by RunTask).
def _take(state, queue, task):
    pending = state._queue_tasks.get(queue, [])
    for i, t in enumerate(pending):
        if t is task:
            del pending[i]
            return True
    return False


def _dispatch(state, queue, task):
    task.dispatch_count += 1
    try:
        status = _srv._make_task_request(queue, task, state._target_host, state._target_port).status
    except _srv.error.HTTPError as e:
        status = e.code
    except Exception:
        status = 500
    if 400 <= status < 600 and (state._max_retries < 0 or task.dispatch_count <= state._max_retries):
        with _cond:
            if queue in state._queue_tasks:
                state._queue_tasks[queue].append(task)
                _push(queue, task, time.time() + RETRY_DELAY)


# The next task due now, or None after waiting for one (at most 0.1 s, to notice a stop or a pause).
def _next_due(self, state, queue):
    with _cond:
        heap = _heaps.setdefault(queue, [])
        wait = 0.1
        if heap and state.queue(queue).state == Queue.State.RUNNING:
            due, _, task = heap[0]
            wait = due - time.time()
            if wait <= 0:
                heapq.heappop(heap)
                return task if _take(state, queue, task) else None
        _cond.wait(min(max(wait, 0.0), 0.1))
        return None


def _process_queue_on_time(self, queue):
    state = self._state
    with ThreadPoolExecutor(DISPATCHERS, thread_name_prefix="dispatch") as pool:
        while self._is_running.is_set() and queue in state._queues and queue in state._queue_tasks:
            task = _next_due(self, state, queue)
            if task is not None:
                pool.submit(_dispatch, state, queue, task)


if os.environ.get({DISPATCH_ENV!r}) != "stock":
    _srv.QueueState.create_task = _create_task_on_time
    _srv.QueueState.purge_queue = _purge_queue_on_time
    _srv.Processor._process_queue = _process_queue_on_time

from gcloud_tasks_emulator.__main__ import main
sys.argv[0] = "gcloud-tasks-emulator"
main()
"""


class EmulatorError(RuntimeError):
    """The Cloud Tasks emulator could not be started."""


def default_python() -> Path:
    """The emulator venv's interpreter: $CLOUD_TASKS_EMULATOR_PYTHON, else <repo>/.venv-emulator."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        return Path(configured)
    return REPO_ROOT / ".venv-emulator" / "bin" / "python"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TasksEmulator:
    """A running `gcloud-tasks-emulator` with one queue; `.host` is what build_tasks_client takes.

    >>> with TasksEmulator("projects/p/locations/l/queues/q") as emulator:
    ...     client = build_tasks_client(emulator.host)
    """

    def __init__(
        self,
        queue_path: str,
        *,
        port: int | None = None,
        python: str | os.PathLike[str] | None = None,
        quiet: bool = True,
        max_retries: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        stock_dispatch: bool = False,
    ) -> None:
        if not QUEUE_PATH_RE.match(queue_path):
            raise ValueError(f"queue_path must be projects/P/locations/L/queues/Q, got {queue_path!r}")
        self.queue_path = queue_path
        self.python = Path(python) if python is not None else default_python()
        self._requested_port = port
        self.port: int | None = port
        # Without -q it logs two lines per pending future task every 0.1 s.
        self.quiet = quiet
        self.max_retries = max_retries
        self.startup_timeout = startup_timeout
        self.stock_dispatch = stock_dispatch
        self._log_path = Path(log_path) if log_path is not None else None
        self._owns_log = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def host(self) -> str:
        if self.port is None:
            raise EmulatorError("the emulator has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def output(self, *, since: int = 0) -> str:
        """What the emulator has printed so far (stdout and stderr), from byte offset `since`."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def start(self) -> Self:
        if self.running:
            return self
        if not self.python.exists():
            raise EmulatorError(
                f"no Python for the Cloud Tasks emulator at {self.python}: run `make install` "
                f"(it builds .venv-emulator) or set {PYTHON_ENV}"
            )
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tasks-emulator-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
            self._owns_log = True
        # A picked port can be taken between picking and binding; pick again then.
        attempts = 3 if self._requested_port is None else 1
        for attempt in range(1, attempts + 1):
            self.port = self._requested_port or free_port()
            self._spawn()
            try:
                self._wait_ready()
                break
            except EmulatorError:
                exited = not self.running
                self._kill()
                if attempt == attempts or not exited:
                    self._cleanup_log()
                    raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        self._kill()
        self._cleanup_log()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self) -> None:
        assert self._log_path is not None and self.port is not None
        args = [str(self.python), "-c", _BOOTSTRAP, "start", "-p", str(self.port), "-d", self.queue_path]
        if self.quiet:
            args.append("-q")
        if self.max_retries is not None:
            args += ["-r", str(self.max_retries)]
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
        env["PYTHONUNBUFFERED"] = "1"
        env[DISPATCH_ENV] = "stock" if self.stock_dispatch else "on-time"
        env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
        # A file, not a pipe: nobody drains a pipe while tests run, and a full pipe would block the
        # emulator mid-dispatch.
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tempfile.gettempdir(),
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        # Imported here so that merely importing this module (e.g. to resolve the interpreter) does
        # not load grpc and the Cloud Tasks client.
        from shared.tasks import build_tasks_client

        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        with build_tasks_client(self.host) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise EmulatorError(
                        f"the Cloud Tasks emulator exited with status {self._proc and self._proc.returncode} "
                        f"during start-up on port {self.port}:\n{self.output()}"
                    )
                # Until our own server has bound the port, an answer could come from another
                # emulator on it; after that the port is ours alone (SO_REUSEPORT is off).
                if READY_MARKER not in self.output(since=self._log_offset):
                    time.sleep(0.05)
                    continue
                try:
                    # A real call through the real client: the server speaks Cloud Tasks and -d
                    # created the queue.
                    client.get_queue(name=self.queue_path, timeout=1.0)
                    return
                except Exception as exc:
                    last_error = exc
                    time.sleep(0.05)
        raise EmulatorError(
            f"the Cloud Tasks emulator did not answer on {self.host} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error!r}); its output:\n{self.output()}"
        )

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        # start_new_session made the emulator a process-group leader: this reaches any children too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def _cleanup_log(self) -> None:
        if self._owns_log and self._log_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._log_path.unlink()
            self._log_path = None
            self._owns_log = False


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """`python -m shared.dev.tasks_emulator QUEUE_PATH [PORT]`: run in the foreground until Ctrl-C."""
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    # Python dies on SIGTERM without unwinding; this lets the `with` below stop the emulator.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    port = int(sys.argv[2]) if len(sys.argv) > 2 else None
    with TasksEmulator(sys.argv[1], port=port) as emulator:
        print(
            f"Cloud Tasks emulator on {emulator.host}, queue {emulator.queue_path}, log {emulator.log_path}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while emulator.running:
                time.sleep(0.5)


if __name__ == "__main__":
    main()
