"""The load generator: many WebSocket clients in one cheap process, driven by ``run.py``.

``python bench/loadgen.py --port P`` reads one JSON command per line on standard input and
answers each with one JSON line on standard output (``{"error": ...}`` if it failed).
Clients are raw non-blocking sockets in one ``epoll`` loop; every frame they send is
encoded and masked once, in advance, so that the generator spends its time in
``send``/``recv`` and the server under test is the bottleneck. Replies are counted by
size, not parsed: every scenario knows how many bytes one reply is (a 32-byte text echo
comes back as a 34-byte frame; the plain TCP floor sends back the client's own 38 bytes).

Commands (``op`` and its arguments; every one is bounded by ``timeout`` seconds):

* ``connect``: open ``count`` WebSockets to ``prefix + str(i)`` (``prefix + str(i //
  per_path)`` with ``per_path``: that many sockets per path), or ``count`` to ``path``,
  into ``group``, ``concurrency`` handshakes at a time.
* ``echo``: each socket of ``group`` keeps ``in_flight`` messages in flight (``kind``:
  ``text``, ``auto`` for the ``"ping"`` auto-response, ``ping`` for protocol pings,
  ``put`` for 32-byte texts whose first 4 characters name one of 16 keys, each message
  different); counts replies after ``warmup`` seconds for ``seconds`` (or until
  ``max_messages``).
* ``broadcast``: ``sender``'s one socket keeps ``in_flight`` broadcasts going; counts the
  deliveries at the ``subs`` sockets.
* ``rooms``: the sockets of ``group`` are rooms of ``room_size`` consecutive sockets (as
  ``connect`` with ``per_path`` opens them); messages are sent from random sockets at
  ``rate`` per socket per second (a Poisson process, seeded: every server gets the same
  sequence), each stamped with its send time; every socket of the room should get it.
  Returns the deliveries lost and the latency percentiles of the measured window.
* ``rtt``: one round trip per socket of ``group``, one after the other; microseconds each.
* ``cycles``: each socket sends, waits for the reply, idles ``gap`` seconds, sends again,
  until ``count`` replies (a hibernate/wake cycle each when ``gap`` > the idle timeout).
* ``close``: reset the sockets of ``group``; ``quit``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import select
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

_MASK: Final = b"\x37\xfa\x21\x3d"
_KEY: Final = "dGhlIHNhbXBsZSBub25jZQ=="
_TEXT: Final = 0x1
_PING: Final = 0x9
_RECV: Final = 65536
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
#: ``rooms`` messages start with the sequence number (16 digits) and the send time (20).
_STAMP_BYTES: Final = 36


class LoadError(Exception):
    """A command could not be carried out (timeout, refused handshake, lost socket)."""


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (payloads under 126 bytes)."""
    if len(payload) >= 126:
        raise ValueError("payloads under 126 bytes only")
    masked = bytes(b ^ _MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + _MASK + masked


#: ``put`` messages: this many different frames, sent in turn.
_PUT_FRAMES: Final = 256
#: ``put`` messages: the first 4 characters name one of this many keys.
_PUT_KEYS: Final = 16


def request_frames(kind: str, payload: int, raw: bool) -> tuple[list[bytes], int]:
    """The frames a client sends for ``kind`` (in turn) and the size of the server's reply."""
    if kind == "put":
        frames = [
            client_frame(_TEXT, f"{i % _PUT_KEYS:04d}{i:028d}".encode()) for i in range(_PUT_FRAMES)
        ]
        return frames, len(frames[0]) if raw else 2 + 32
    frame, reply = request_and_reply(kind, payload, raw)
    return [frame], reply


def request_and_reply(kind: str, payload: int, raw: bool) -> tuple[bytes, int]:
    """The frame a client sends for ``kind`` and the size of the server's reply."""
    if kind == "text":
        body = (b"0123456789abcdef" * (payload // 16 + 1))[:payload]
        frame, reply = client_frame(_TEXT, body), 2 + payload
    elif kind == "auto":
        frame, reply = client_frame(_TEXT, b"ping"), 2 + len(b"pong")
    elif kind == "ping":
        frame, reply = client_frame(_PING, b"12345678"), 2 + 8
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return frame, len(frame) if raw else reply


class LoadGen:
    """The clients, in named groups of sockets."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.groups: dict[str, list[socket.socket]] = {}
        #: Every hot loop reads into this one buffer (no allocation per ``recv``).
        self._buffer = bytearray(_RECV)

    # -- commands --------------------------------------------------------------------------

    def connect(
        self,
        group: str,
        count: int,
        prefix: str = "",
        path: str = "",
        per_path: int = 1,
        concurrency: int = 64,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        started = time.perf_counter()
        sockets = self.groups.setdefault(group, [])
        ep = select.epoll()
        pending: dict[int, tuple[socket.socket, bytearray]] = {}
        opened = 0
        try:
            while opened < count or pending:
                while opened < count and len(pending) < concurrency:
                    target = path or f"{prefix}{opened // per_path}"
                    sock = self._open(target, deadline)
                    ep.register(sock.fileno(), select.EPOLLIN)
                    pending[sock.fileno()] = (sock, bytearray())
                    opened += 1
                if time.monotonic() > deadline:
                    raise LoadError(f"connect: {len(sockets)} of {count} open at the deadline")
                for fd, _ in ep.poll(0.2):
                    sock, buf = pending[fd]
                    data = sock.recv(4096)
                    if not data:
                        raise LoadError(f"connect: closed during the handshake ({bytes(buf)!r})")
                    buf += data
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    if not buf.startswith(b"HTTP/1.1 101"):
                        raise LoadError(f"connect: refused: {bytes(buf[:200])!r}")
                    if len(buf) > end + 4:
                        raise LoadError("connect: unexpected data after the 101 response")
                    ep.unregister(fd)
                    del pending[fd]
                    sockets.append(sock)
        finally:
            ep.close()
            for sock, _ in pending.values():
                sock.close()
        return {"count": len(sockets), "seconds": time.perf_counter() - started}

    def _open(self, target: str, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(self.address)
            sock.sendall(
                f"GET {target} HTTP/1.1\r\nHost: {self.address[0]}:{self.address[1]}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode("latin-1")
            )
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def echo(
        self,
        group: str,
        kind: str = "text",
        payload: int = 32,
        raw: bool = False,
        in_flight: int = 1,
        warmup: float = 1.0,
        seconds: float = 5.0,
        max_messages: int = 0,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        sockets = self._group(group)
        frames, reply = request_frames(kind, payload, raw)
        frame = frames[0]
        ring = len(frames)
        turn = 0
        by_fd = {s.fileno(): s for s in sockets}
        receive = {fd: s.recv_into for fd, s in by_fd.items()}
        send = {fd: s.send for fd, s in by_fd.items()}
        buf = self._buffer
        rx = dict.fromkeys(by_fd, 0)
        ep = select.epoll()
        try:
            for fd in by_fd:
                ep.register(fd, select.EPOLLIN)
            for sock in sockets:
                for _ in range(in_flight):
                    sock.send(frames[turn % ring])
                    turn += 1
            count = 0
            now = start = time.perf_counter()
            measure_from = start + warmup
            base: int | None = None
            base_time = start
            end = measure_from + seconds
            hard_end = start + timeout
            poll = ep.poll
            while True:
                for fd, _ in poll(0.05):
                    got = receive[fd](buf)
                    if not got:
                        raise LoadError("echo: the server closed a connection")
                    n = rx[fd] + got
                    while n >= reply:
                        n -= reply
                        count += 1
                        if ring == 1:
                            send[fd](frame)
                        else:
                            send[fd](frames[turn % ring])
                            turn += 1
                    rx[fd] = n
                now = time.perf_counter()
                if base is None and now >= measure_from:
                    base, base_time = count, now
                if max_messages:
                    if count >= max_messages:
                        break
                    if now >= hard_end:
                        raise LoadError(f"echo: {count} of {max_messages} replies at the deadline")
                elif now >= end:
                    break
            measured = count - (base or 0)
            elapsed = now - base_time
            # Every socket has exactly ``in_flight`` requests out: wait for those replies.
            self._drain(ep, by_fd, rx, reply, len(sockets) * in_flight * reply)
        finally:
            ep.close()
        return {
            "messages": measured,
            "seconds": elapsed,
            "rate": measured / elapsed,
            # Every reply of the call, warm-up and drain included (CPU per message).
            "all_messages": count + len(sockets) * in_flight,
        }

    def _drain(
        self,
        ep: select.epoll,
        by_fd: dict[int, socket.socket],
        rx: dict[int, int],
        unit: int,
        expected: int,
        timeout: float = 30.0,
    ) -> None:
        """Read until ``expected`` more bytes (beyond the partial ones in ``rx``) arrived."""
        owed = expected - sum(rx.values())
        deadline = time.monotonic() + timeout
        while owed > 0:
            if time.monotonic() > deadline:
                raise LoadError(f"drain: {owed} bytes still owed at the deadline")
            for fd, _ in ep.poll(0.1):
                data = by_fd[fd].recv(_RECV)
                if not data:
                    raise LoadError("drain: the server closed a connection")
                owed -= len(data)
        if owed < 0:
            raise LoadError(f"drain: {-owed} bytes more than expected (reply size {unit})")
        for fd in rx:
            rx[fd] = 0

    def broadcast(
        self,
        subs: str,
        sender: str,
        payload: int = 64,
        raw: bool = False,
        in_flight: int = 8,
        warmup: float = 1.0,
        seconds: float = 5.0,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        subscribers = self._group(subs)
        source = self._group(sender)[0]
        frame, size = request_and_reply("text", payload, raw)
        nsubs = len(subscribers)
        source_fd = source.fileno()
        by_fd = {s.fileno(): s for s in subscribers}
        by_fd[source_fd] = source
        receive = {fd: s.recv_into for fd, s in by_fd.items()}
        buf = self._buffer
        ep = select.epoll()
        try:
            for fd in by_fd:
                ep.register(fd, select.EPOLLIN)
            delivered = acked = sent = 0
            now = start = time.perf_counter()
            measure_from = start + warmup
            end = measure_from + seconds
            base: int | None = None
            base_time = start
            poll = ep.poll
            per_broadcast = size * nsubs
            while True:
                done = min(acked // size, delivered // per_broadcast)
                if sent - done < in_flight:
                    more = in_flight - (sent - done)
                    source.send(frame * more)
                    sent += more
                for fd, _ in poll(0.05):
                    got = receive[fd](buf)
                    if not got:
                        raise LoadError("broadcast: the server closed a connection")
                    if fd == source_fd:
                        acked += got
                    else:
                        delivered += got
                now = time.perf_counter()
                if base is None and now >= measure_from:
                    base, base_time = delivered, now
                if now >= end:
                    break
                if now - start > timeout:
                    raise LoadError("broadcast: timed out")
            measured = (delivered - (base or 0)) / size
            elapsed = now - base_time
            # Let every broadcast already sent reach every socket.
            owed = sent * size * (nsubs + 1) - delivered - acked
            drain_until = time.monotonic() + 30.0
            while owed > 0:
                if time.monotonic() > drain_until:
                    raise LoadError(f"broadcast: {owed} bytes still owed at the deadline")
                for fd, _ in poll(0.1):
                    data = by_fd[fd].recv(_RECV)
                    if not data:
                        raise LoadError("broadcast: the server closed a connection")
                    owed -= len(data)
        finally:
            ep.close()
        return {
            "deliveries": measured,
            "broadcasts": sent,
            "seconds": elapsed,
            "rate": measured / elapsed,
            # Every delivery of the call, warm-up and drain included (CPU per message).
            "all_messages": sent * nsubs,
        }

    def rtt(
        self, group: str, kind: str = "text", payload: int = 32, raw: bool = False
    ) -> dict[str, Any]:
        frame, reply = request_and_reply(kind, payload, raw)
        samples = []
        clock = time.perf_counter_ns
        for sock in self._group(group):
            sock.settimeout(10.0)
            try:
                got = 0
                started = clock()
                sock.send(frame)
                while got < reply:
                    data = sock.recv(_RECV)
                    if not data:
                        raise LoadError("rtt: the server closed a connection")
                    got += len(data)
                samples.append((clock() - started) / 1000.0)
            except TimeoutError:
                raise LoadError("rtt: no reply within 10 s") from None
            finally:
                sock.setblocking(False)
            if got != reply:
                raise LoadError(f"rtt: {got} bytes where {reply} were expected")
        return {"rtt_us": samples}

    def cycles(
        self,
        group: str,
        count: int,
        gap: float,
        payload: int = 32,
        raw: bool = False,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        sockets = self._group(group)
        frame, reply = request_and_reply("text", payload, raw)
        by_fd = {s.fileno(): s for s in sockets}
        rx = dict.fromkeys(by_fd, 0)
        start = time.perf_counter()
        due: deque[tuple[float, int]] = deque((start, fd) for fd in by_fd)
        sent = received = 0
        ep = select.epoll()
        try:
            for fd in by_fd:
                ep.register(fd, select.EPOLLIN)
            while received < count:
                now = time.perf_counter()
                if now - start > timeout:
                    raise LoadError(f"cycles: {received} of {count} replies at the deadline")
                while due and due[0][0] <= now and sent < count:
                    by_fd[due.popleft()[1]].send(frame)
                    sent += 1
                wait = min(0.05, max(0.0, due[0][0] - now)) if due else 0.05
                for fd, _ in ep.poll(wait):
                    data = by_fd[fd].recv(_RECV)
                    if not data:
                        raise LoadError("cycles: the server closed a connection")
                    n = rx[fd] + len(data)
                    if n >= reply:
                        n -= reply
                        received += 1
                        due.append((time.perf_counter() + gap, fd))
                    rx[fd] = n
        finally:
            ep.close()
        elapsed = time.perf_counter() - start
        return {"messages": received, "seconds": elapsed, "rate": received / elapsed}

    def rooms(
        self,
        group: str,
        room_size: int,
        rate: float,
        payload: int = 64,
        warmup: float = 3.0,
        seconds: float = 10.0,
        drain: float = 5.0,
        seed: int = 13,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        sockets = self._group(group)
        if payload < _STAMP_BYTES or payload >= 126:
            raise ValueError(f"rooms: payload {payload} B, must be {_STAMP_BYTES}-125")
        if len(sockets) % room_size:
            raise ValueError(f"rooms: {len(sockets)} sockets are not rooms of {room_size}")
        delivery = 2 + payload  # an unmasked server frame: 2-byte header + payload
        header = bytes((0x80 | _TEXT, payload))
        fds = [s.fileno() for s in sockets]
        by_fd = dict(zip(fds, sockets, strict=True))
        pending: dict[int, bytearray] = {fd: bytearray() for fd in fds}
        rng = random.Random(seed)
        per_second = rate * len(sockets)
        #: seq -> deliveries still owed (room_size at the send); measured or not.
        owed: dict[int, int] = {}
        measured_seqs: set[int] = set()
        latencies: list[int] = []  # ns, deliveries of measured messages
        closed: set[int] = set()
        sent = sent_measured = deliveries = unexpected = skipped = 0
        clock = time.perf_counter_ns
        ep = select.epoll()
        try:
            for fd in fds:
                ep.register(fd, select.EPOLLIN)
            start = time.perf_counter()
            measure_from = start + warmup
            measure_from_ns = int(measure_from * 1e9)  # perf_counter_ns: the same clock
            end = measure_from + seconds
            due = start + rng.expovariate(per_second)
            while True:
                now = time.perf_counter()
                if now - start > timeout:
                    raise LoadError("rooms: timed out")
                sending = now < end
                while sending and due <= now:
                    index = rng.randrange(len(fds))
                    due += rng.expovariate(per_second)
                    fd = fds[index]
                    if fd in closed:
                        skipped += 1
                        continue
                    stamp = clock()
                    body = f"{sent:>16}{stamp:>20}".encode().ljust(payload, b".")
                    frame = client_frame(_TEXT, body)
                    try:
                        if by_fd[fd].send(frame) != len(frame):
                            raise LoadError("rooms: a send did not fit the socket buffer")
                    except ConnectionError:
                        closed.add(fd)
                        ep.unregister(fd)
                        skipped += 1
                        continue
                    owed[sent] = room_size
                    if stamp >= measure_from_ns:
                        measured_seqs.add(sent)
                        sent_measured += 1
                    sent += 1
                if not sending and (not owed or now > end + drain):
                    break
                wait = min(0.05, max(0.0, due - now)) if sending else 0.05
                for fd, _ in ep.poll(wait):
                    if fd in closed:  # closed by a failed send in this batch
                        continue
                    try:
                        data = by_fd[fd].recv(_RECV)
                    except ConnectionError:
                        data = b""
                    received = clock()
                    if not data:
                        closed.add(fd)
                        ep.unregister(fd)
                        continue
                    buf = pending[fd]
                    buf += data
                    offset = 0
                    while len(buf) - offset >= delivery:
                        if buf[offset : offset + 2] != header:
                            got = bytes(buf[offset : offset + 2])
                            raise LoadError(f"rooms: a frame with header {got!r}, not {header!r}")
                        seq = int(buf[offset + 2 : offset + 18])
                        stamp = int(buf[offset + 18 : offset + 38])
                        offset += delivery
                        left = owed.get(seq)
                        if left is None:
                            unexpected += 1
                            continue
                        deliveries += 1
                        if left == 1:
                            del owed[seq]
                        else:
                            owed[seq] = left - 1
                        if seq in measured_seqs:
                            latencies.append(received - stamp)
                    del buf[:offset]
        finally:
            ep.close()
        lost_measured = sum(left for seq, left in owed.items() if seq in measured_seqs)
        latencies.sort()

        def ms(fraction: float) -> float | None:
            if not latencies:
                return None
            return latencies[min(len(latencies) - 1, int(fraction * len(latencies)))] / 1e6

        return {
            "sockets": len(sockets),
            "rooms": len(sockets) // room_size,
            "sent": sent_measured,
            "expected": sent_measured * room_size,
            "deliveries": len(latencies),
            "lost": lost_measured,
            "lost_all": sum(owed.values()),
            "unexpected": unexpected,
            "closed": len(closed),
            "skipped": skipped,
            "all_messages": deliveries,
            "all_sent": sent,
            "seconds": seconds,
            "rate": len(latencies) / seconds,
            "p50_ms": ms(0.50),
            "p90_ms": ms(0.90),
            "p99_ms": ms(0.99),
            "p999_ms": ms(0.999),
            "max_ms": latencies[-1] / 1e6 if latencies else None,
        }

    def close(self, group: str) -> dict[str, Any]:
        sockets = self.groups.pop(group, [])
        for sock in sockets:
            sock.close()  # SO_LINGER 0: a reset, no TIME_WAIT left behind
        return {"closed": len(sockets)}

    def _group(self, name: str) -> list[socket.socket]:
        sockets = self.groups.get(name)
        if not sockets:
            raise LoadError(f"no open sockets in group {name!r}")
        return sockets


def main() -> int:
    parser = argparse.ArgumentParser(description="WebSocket load generator (see bench/run.py)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # 10,000 client sockets must fit: take the hard descriptor limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    gen = LoadGen(args.host, args.port)
    commands: dict[str, Callable[..., dict[str, Any]]] = {
        "connect": gen.connect,
        "echo": gen.echo,
        "broadcast": gen.broadcast,
        "rtt": gen.rtt,
        "cycles": gen.cycles,
        "rooms": gen.rooms,
        "close": gen.close,
    }
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            result = commands[op](**command)
        except (LoadError, OSError, ValueError, KeyError, TypeError) as exc:
            result = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
