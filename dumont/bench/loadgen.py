"""An open-loop HTTP/1.1 load generator, cheap enough to share two cores with the server it measures.

Request i is *due* at `start + i / rate`, whether or not earlier ones were answered (open loop), and
its latency is counted from that due time, so a server that falls behind shows it in the latency
instead of quietly receiving fewer requests (no coordinated omission, which `wrk` suffers from and
`wrk2`, not in Debian, fixes). Requests are pre-built bytes (signed ahead of time by the caller);
each loader process drives keep-alive sockets with `selectors`, one request in flight per socket,
opening another socket when all are busy. Django-free: loaders are forked processes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable

# (global request index, wall-clock time it is due) -> (raw request bytes, the nonce it carries or "")
RequestFactory = Callable[[int, float], tuple[bytes, str]]


@dataclasses.dataclass
class LoaderResult:
    latencies: list[float]  # seconds, of the 2xx answers
    statuses: dict[int, int]  # status code (0: connection error) -> count
    accepted_nonces: list[str]
    finished_at: float
    cpu_seconds: float


class _Connection:
    __slots__ = ("sock", "buffer", "request")

    def __init__(self, address: tuple[str, int]):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer = b""
        self.request: int | None = None


def _parse(buffer: bytes) -> tuple[int, bool, bytes] | None:
    """(status, keep_alive, rest) once a whole response is in `buffer`."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].decode("latin-1").lower()
    length = 0
    for line in head.split("\r\n")[1:]:
        if line.startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    if len(buffer) < end + 4 + length:
        return None
    status = int(head.split(" ", 2)[1])
    keep_alive = "connection: close" not in head
    return status, keep_alive, buffer[end + 4 + length:]


def _drive(address: tuple[str, int], requests: list[tuple[int, bytes, str]], start: float, rate: float,
           max_connections: int) -> LoaderResult:
    cpu_start = time.process_time()
    selector = selectors.DefaultSelector()
    idle: list[_Connection] = []
    open_count = 0
    due: deque[int] = deque()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted: list[str] = []
    next_index, done, total = 0, 0, len(requests)

    def due_at(position: int) -> float:
        return start + requests[position][0] / rate

    def finish(conn: _Connection, status: int) -> None:
        nonlocal done
        position = conn.request
        conn.request = None
        done += 1
        statuses[status] = statuses.get(status, 0) + 1
        if 200 <= status < 300:
            latencies.append(time.perf_counter() - due_at(position))
            if requests[position][2]:
                accepted.append(requests[position][2])

    def drop(conn: _Connection) -> None:
        nonlocal open_count
        selector.unregister(conn.sock)
        conn.sock.close()
        open_count -= 1

    while done < total:
        now = time.perf_counter()
        while next_index < total and due_at(next_index) <= now:
            due.append(next_index)
            next_index += 1
        while due and (idle or open_count < max_connections):
            if idle:
                conn = idle.pop()
            else:
                conn = _Connection(address)
                selector.register(conn.sock, selectors.EVENT_READ, conn)
                open_count += 1
            conn.request = due.popleft()
            conn.sock.setblocking(True)  # a request is a few hundred bytes: one send, never blocks long
            conn.sock.sendall(requests[conn.request][1])
            conn.sock.setblocking(False)
        wait = 0.05 if next_index >= total or due else max(0.0, due_at(next_index) - time.perf_counter())
        for key, _ in selector.select(min(wait, 0.05)):
            conn = key.data
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if not chunk:  # closed by the server
                if conn.request is not None:
                    finish(conn, 0)
                drop(conn)
                continue
            conn.buffer += chunk
            parsed = _parse(conn.buffer)
            if parsed is None:
                continue
            status, keep_alive, conn.buffer = parsed
            finish(conn, status)
            if keep_alive:
                idle.append(conn)
            else:
                drop(conn)
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    return LoaderResult(latencies, statuses, accepted, time.perf_counter(), time.process_time() - cpu_start)


def _loader(queue, address, factory: RequestFactory, indices: range, start: float, rate: float,
            max_connections: int) -> None:
    to_wall = time.time() - time.perf_counter()
    # built before `start`, outside the measurement; signed with the time each is due
    requests = [(i, *factory(i, start + i / rate + to_wall)) for i in indices]
    queue.put(_drive(address, requests, start, rate, max_connections))


def run_load(*, address: tuple[str, int], factory: RequestFactory, rate: float, seconds: float, start: float,
             loaders: int = 2, connections_per_loader: int = 32) -> list[LoaderResult]:
    """Send rate x seconds requests from `start` on (a time.perf_counter() value, a clock that forked
    children share on Linux), spread over `loaders` forked processes; the time before `start` is for
    building the requests."""
    total = int(rate * seconds)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [
        context.Process(target=_loader, args=(queue, address, factory, range(k, total, loaders), start, rate,
                                               connections_per_loader), daemon=True)
        for k in range(loaders)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=start - time.perf_counter() + seconds + 120) for _ in processes]
    for process in processes:
        process.join(10)
    return results
