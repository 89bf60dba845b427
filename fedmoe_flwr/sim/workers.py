"""ClientApp calls on a pool of forked worker processes (``LocalGrid(..., workers=N)``).

Why processes and forking: a ClientApp call of the shipped models is mostly Python and
small tensor ops holding the GIL, so threads barely overlap; forked workers inherit the
ClientApp (closures, which could not be pickled), the loaded datasets and the cached model
skeletons for free. Only the message, its node's ``Context`` and the reply are pickled.

Each ClientApp call seeds what it draws from ``(seed, round, client)`` and runs with one
torch thread, so where it runs does not change its reply; the pool returns replies in the
order of the messages.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

CLIENT_APP_RAISED = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION

_APP: ClientApp | None = None  # the worker's ClientApp, set once when the worker starts


def not_connected(msg: Message) -> Message:
    """The error reply to a message for a node that is not (or no longer) connected."""
    return Message(Error(code=CLIENT_APP_RAISED, reason=f"node {msg.metadata.dst_node_id} is not connected"), reply_to=msg)


def call_client_app(client_app: ClientApp, msg: Message, context: Context) -> Message:
    """One ClientApp call; its exception becomes an error reply, as in Flower."""
    try:
        return client_app(msg, context)
    except Exception as ex:
        reason = f"{type(ex).__name__}: {ex}\n{traceback.format_exc(limit=3)}"
        return Message(Error(code=CLIENT_APP_RAISED, reason=reason), reply_to=msg)


def _start_worker(client_app: ClientApp) -> None:
    global _APP
    _APP = client_app  # inherited through fork, never pickled


def _run(job: tuple[Message, Context | None]) -> tuple[Message, Context | None]:
    msg, context = job
    if context is None:
        return not_connected(msg), None
    return call_client_app(_APP, msg, context), context


class WorkerPool:
    """``workers`` forked processes running one ClientApp; :meth:`map` keeps the message order."""

    def __init__(self, client_app: ClientApp, workers: int):
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("LocalGrid(workers > 1) needs the 'fork' start method (Linux, macOS); use workers=1")
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork"),
                                             initializer=_start_worker, initargs=(client_app,))

    def map(self, jobs: list[tuple[Message, Context | None]]) -> list[tuple[Message, Context | None]]:
        try:
            return list(self._executor.map(_run, jobs))
        except BrokenProcessPool as ex:
            raise RuntimeError("a LocalGrid worker process died (out of memory, or killed); "
                               "rerun with fewer workers or workers=1") from ex

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
