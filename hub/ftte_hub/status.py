"""The live status of a running hub: a read-only page at ``/`` and its data at ``/status.json``.

    server = StatusServer(StatusView(run).snapshot, "127.0.0.1", 8787)
    await server.start(); print(server.url); ...; await server.close()

``ftte-hub train --status ADDRESS:PORT`` (and ``ftte-hub demo --status``) serve it from the hub's
own asyncio loop. It only READS the run: the journaled round driver stays the one place that
changes run state. It can never slow down or break training:

* the JSON is built at most once per ``min_interval`` seconds, however many clients ask, and its
  size is bounded (curve points, agent rows and events are capped), so a request costs at most
  one bounded snapshot plus copying bytes;
* a request is one connection: its head must arrive within ``head_timeout`` seconds and fit in
  ``MAX_HEAD_BYTES`` with at most ``MAX_HEADERS`` header lines, the answer must be taken within
  ``write_timeout`` seconds, at most ``max_connections`` are open at once and at most
  ``max_rate`` requests per second are answered (more get a short 503);
  every breach gets one short error response (or the connection is cut) and never waits longer;
* only GET and HEAD of ``/`` and ``/status.json`` are served; nothing a client sends beyond the
  request head is used (at most ``LINGER_BYTES`` more are read and dropped while closing), and
  nothing a client sends changes anything;
* a failure while building a snapshot answers 500 (or the previous snapshot) and is logged once.

It shows nothing secret: no key material and no training data; only counts, the model's accuracy,
agent names, addresses, budgets and the hub's recent log lines (as on the hub's stderr). The page is self-contained
(inline script and style, an SVG plot, no fonts or external resources; a Content-Security-Policy
forbids anything else), so it works offline on a LAN.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import math
import time
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

from .logs import LOGGER_NAME, event

MAX_HEAD_BYTES = 8192          # request line plus headers
MAX_HEADERS = 64               # header lines in one request
MAX_CONNECTIONS = 16           # open at once; more get 503
MAX_RATE = 20.0                # requests answered per second on average (40 pages polling every 2 s); more get 503
HEAD_TIMEOUT = 5.0             # s for the whole request head to arrive (a slow client is cut off)
WRITE_TIMEOUT = 10.0           # s for the client to take the answer
LINGER_S = 1.0                 # s an answered connection waits for the client to close ...
LINGER_BYTES = 64 << 10        # ... while discarding at most this much it still sends
MIN_INTERVAL = 0.5             # s between two snapshots (requests in between get the same bytes)
REFRESH_MS = 2000              # how often the page asks for /status.json
MAX_AGENT_ROWS = 200           # agents listed (the rest are counted)
EVENTS_KEPT = 40               # recent log lines shown (besides merges) ...
MERGES_KEPT = 5                # ... and merge lines
EVENT_CHARS = 300
ETA_WINDOW = 20                # merges the ETA's trend is fitted over

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


def parse_status_address(text: str) -> Tuple[str, int]:
    """'127.0.0.1:8787', '0.0.0.0:8787', 'hub.local:8787' or '[::1]:8787' -> (host, port); ValueError."""
    text = str(text).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--status {text!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:8787")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"--status {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"--status {text!r}: write an IPv6 address in brackets, e.g. [::1]:8787")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--status {text!r}: the port must be a number 0..65535") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--status {text!r}: the port must be 0..65535 (0: any free port)")
    return host, port


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


# ---------------------------------------------------------------------------------------------
class RecentEvents(logging.Handler):
    """The hub's last INFO-or-above log lines, for the page (bounded deques; cheap to emit).

    Merge lines (one per version, also drawn as the curve) are kept apart, only the last
    ``keep_merges`` of them, so agents joining and leaving, rejections and the like stay in view.
    """

    def __init__(self, keep: int = EVENTS_KEPT, keep_merges: int = MERGES_KEPT):
        super().__init__(logging.INFO)
        self.others: deque = deque(maxlen=keep)
        self.merges: deque = deque(maxlen=keep_merges)
        self._seq = 0

    @property
    def lines(self) -> List[Dict[str, Any]]:
        """The kept lines, oldest first."""
        with self.lock:  # emit() runs under it, maybe in another thread (a worker thread logging)
            kept = list(self.others) + list(self.merges)
        return sorted(kept, key=lambda e: e["seq"])

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        name = str(getattr(record, "event", "log"))
        self._seq += 1
        (self.merges if name == "merge" else self.others).append({
            "seq": self._seq, "time": round(record.created, 3), "level": record.levelname.lower(), "event": name,
            "message": message[:EVENT_CHARS]})

    def attach(self) -> "RecentEvents":
        logging.getLogger(LOGGER_NAME).addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger(LOGGER_NAME).removeHandler(self)


def finite(x: Any) -> Optional[float]:
    """A float for JSON, or None (NaN and infinities are not JSON)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def eta(curve: List[List[float]], now_s: float, target: Optional[float],
        max_versions: Optional[int]) -> Dict[str, Any]:
    """Time to --target-accuracy and to --max-versions, from the trend of the last ETA_WINDOW merges.

    Target: a least-squares line of accuracy against run time over those merges; the ETA is when
    that line, drawn from the latest accuracy, meets the target (none while accuracy is not
    rising). Max versions: the versions per second over the same merges. Both count from now.
    """
    out: Dict[str, Any] = {"target_s": None, "target_note": "", "max_versions_s": None, "window": ETA_WINDOW}
    pts = [p for p in curve[-ETA_WINDOW:] if finite(p[2]) is not None]
    last = pts[-1] if pts else None
    if target is None:
        out["target_note"] = "no --target-accuracy"
    elif last is not None and last[2] >= target:
        out["target_s"], out["target_note"] = 0.0, "reached"
    elif len(pts) < 3 or pts[-1][1] - pts[0][1] <= 0:
        out["target_note"] = "after a few merges"
    else:
        n = len(pts)
        mt = sum(p[1] for p in pts) / n
        ma = sum(p[2] for p in pts) / n
        var = sum((p[1] - mt) ** 2 for p in pts)
        slope = sum((p[1] - mt) * (p[2] - ma) for p in pts) / var if var > 0 else 0.0
        if slope <= 0:
            out["target_note"] = f"accuracy is not rising over the last {n} merges"
        else:
            out["target_s"] = max(0.0, last[1] + (target - last[2]) / slope - now_s)
            out["target_note"] = f"trend of the last {n} merges"
    if max_versions is not None and len(pts) >= 2 and pts[-1][1] > pts[0][1] and pts[-1][0] > pts[0][0]:
        rate = (pts[-1][0] - pts[0][0]) / (pts[-1][1] - pts[0][1])
        out["max_versions_s"] = max(0.0, pts[-1][1] + max(0, max_versions - pts[-1][0]) / rate - now_s)
    return out


class StatusView:
    """Builds the JSON-able snapshot of one run (a ``train._Run``) without changing anything."""

    def __init__(self, run, events: Optional[RecentEvents] = None):
        self.run = run
        self.events = events
        self._trainable: Optional[Tuple[int, int]] = None

    def _phase(self) -> Tuple[str, str]:
        run = self.run
        if run.fatal:
            return "failed", run.fatal
        if run.finished.is_set():
            return "stopping", run.finish_reason
        if run.driver is None:
            f = run.fleet
            usable = sum(1 for s in f.sessions.values() if f.why_not_used(s.info) is None)
            return "waiting", f"{usable} of {run.cfg.min_agents} usable agents (--min-agents) have joined"
        return "training", ""

    def _subset(self) -> Dict[str, Any]:
        run, f = self.run, self.run.fleet
        meta = run.meta_base
        if run.driver is None or run.model is None:
            return {"chosen": False, "needed_bytes": int(f.needed_bytes), "needed_what": f.needed_what,
                    "batch_size": int(run.cfg.batch_size)}
        if self._trainable is None:
            self._trainable = (int(run.driver.subset.num_trainable(run.model)), int(run.model.num_params()))
        return {"chosen": True, "described": meta.get("subset_described", ""), "trainable_params": self._trainable[0],
                "params": self._trainable[1], "predicted_bytes": meta.get("needed_bytes"), "m_min": meta.get("m_min"),
                "batch_size": int(meta.get("task_config", {}).get("batch_size", run.cfg.batch_size)),
                "model": meta.get("model_name", ""), "strategy": meta.get("strategy", ""), "buffer": meta.get("buffer"),
                **({"tiers": meta["tiers_described"]} if "tiers_described" in meta else {})}

    def _tier_of(self, st: Dict[str, Any], info: Dict[str, Any]) -> Optional[int]:
        """ftte-tiered: the tier the agent trains (its last task's; before any, what its budget
        holds); None for single-subset strategies or an agent that fits no tier."""
        driver = self.run.driver
        if driver is None or not driver.strategy.tiers:
            return None
        if "tier" in st:
            return int(st["tier"])
        budget = info.get("memory_budget")
        return driver.strategy.tier_for_budget(budget) if budget is not None else None

    def _agents(self, now: float) -> Tuple[List[Dict[str, Any]], int]:
        run, f = self.run, self.run.fleet
        coord = run.coord
        counts = coord.agents if coord is not None else {}
        address_of = f.agent_addresses()
        rows = []
        for aid in set(f.sessions) | set(f.infos) | set(counts):
            s = f.sessions.get(aid)
            info = s.info if s is not None else f.infos.get(aid, {})
            st = counts.get(aid, {})
            addr = s.addr if s is not None else address_of.get(aid)
            if s is not None:
                if s.task_id is not None:
                    state, why = "training", f"task for {max(0.0, time.monotonic() - s.task_sent_at):.0f} s"
                elif st.get("not_used"):
                    state, why = "not used", st.get("not_used_reason", "")
                elif not s.usable:
                    why = f.why_not_used(info) if "memory_budget" in info else None
                    state, why = ("not used", why) if why else \
                        ("idle", "waiting for the run to start" if run.driver is None else "joining")
                else:
                    state, why = "idle", "no new tasks (stopping)" if f.draining else "waiting for a task"
                b_in, b_out = f.ended_bytes.get(aid, (0, 0))
                b_in, b_out = b_in + s.ch.bytes_received, b_out + s.ch.bytes_sent
                seen = s.last_seen()
            else:
                err = f.dial_errors.get(addr) if addr is not None else None
                state = "gone"
                why = (f"not connected: {err}" if err else "not connected") + \
                    ("" if aid in f.infos else " (known from the checkpoint)")
                if st.get("not_used"):
                    why += "; was not used: " + st.get("not_used_reason", "")
                b_in, b_out = f.ended_bytes.get(aid, (0, 0))
                seen = f.last_seen.get(aid)
            accepted = int(st.get("accepted", 0))
            rows.append({
                "agent_id": aid, "name": str(st.get("name") or info.get("name") or aid), "state": state, "why": why,
                "address": f"{addr[0]}:{addr[1]}" if addr else "",
                "memory_budget": info.get("memory_budget"), "speed": finite(info.get("speed")),
                "tier": self._tier_of(st, info),
                "samples_declared": info.get("num_samples"),
                "tasks": int(st.get("tasks", 0)), "accepted": accepted, "rejected": int(st.get("rejected", 0)),
                "rejected_by_reason": dict(st.get("rejected_by_reason", {})), "failed": int(st.get("failed", 0)),
                "dropped": int(st.get("dropped", 0)), "samples": int(st.get("samples", 0)),
                "mean_staleness": round(st.get("staleness_sum", 0) / accepted, 3) if accepted else None,
                "update_bytes": int(st.get("update_bytes", 0)), "bytes_in": int(b_in), "bytes_out": int(b_out),
                "last_seen_unix": round(seen, 3) if seen is not None else None,
                "last_seen_s_ago": round(max(0.0, now - seen), 1) if seen is not None else None,
            })
        order = {"training": 0, "idle": 1, "not used": 2, "gone": 3}
        rows.sort(key=lambda r: (order[r["state"]], r["name"], r["agent_id"]))
        return rows[:MAX_AGENT_ROWS], max(0, len(rows) - MAX_AGENT_ROWS)

    def snapshot(self) -> Dict[str, Any]:
        run, cfg, f = self.run, self.run.cfg, self.run.fleet
        now = time.time()
        elapsed = run.elapsed
        phase, detail = self._phase()
        agents, more = self._agents(now)
        b_in, b_out = f.bytes_totals()
        d = run.driver
        st = d.stats() if d is not None else {}
        version = int(d.version) if d is not None else 0
        curve = [[p[0], p[1], finite(p[2]), finite(p[3])] for p in run.curve]  # NaN is not JSON
        import ftte_core
        return {
            "software": f"ftte-fleet {ftte_core.__version__}", "phase": phase, "phase_detail": detail,
            "updated_unix": round(now, 3), "elapsed_s": round(elapsed, 3), "refresh_ms": REFRESH_MS,
            "version": version, "max_versions": d.max_versions if d is not None else cfg.max_versions,
            "accuracy": finite(run.last_accuracy) if d is not None else None,
            "accuracy_version": curve[-1][0] if curve else None,   # evaluation follows the merges
            "loss": finite(run.last_loss) if d is not None else None,
            "best_accuracy": finite(run.best_accuracy) if d is not None else None,
            "start_accuracy": finite(run.start_accuracy) if d is not None else None,
            "target_accuracy": cfg.target_accuracy,
            "eta": eta(curve, elapsed, cfg.target_accuracy, d.max_versions if d is not None else cfg.max_versions),
            "subset": self._subset(),
            "totals": {"bytes_in": int(b_in), "bytes_out": int(b_out), "tasks_issued": st.get("tasks_issued", 0),
                       "accepted": st.get("accepted", 0), "rejected": st.get("rejected", 0),
                       "rejected_by_reason": st.get("rejected_by_reason", {}), "merged_updates": st.get("merged_updates", 0),
                       "buffered": st.get("buffered", 0), "mean_staleness": finite(st.get("mean_staleness")),
                       "dropped": st.get("dropped", 0), "in_flight": f.in_flight(),
                       "agents_active": f.active_agents(), "agents_known": len(agents) + more},
            "curve_fields": ["version", "time_s", "accuracy", "loss"], "curve": curve,
            "agents": agents, "agents_left_off": more,
            "events": self.events.lines if self.events is not None else [],
        }


# ---------------------------------------------------------------------------------------------
class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    pass


async def read_request_head(reader: asyncio.StreamReader) -> Tuple[str, str]:
    """(method, path without the query) of one request head; BadRequest or ClientGone otherwise."""
    total = 0
    lines: List[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise BadRequest(431, f"the request head is over {MAX_HEAD_BYTES} bytes") from None
        except asyncio.IncompleteReadError as e:
            if not lines and not e.partial.strip():
                raise ClientGone() from None
            raise BadRequest(400, "the request head ended early") from None
        total += len(line)
        if total > MAX_HEAD_BYTES:
            raise BadRequest(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                break
            continue  # empty lines before the request line are allowed (RFC 9112 2.2)
        lines.append(line)
        if len(lines) > MAX_HEADERS + 1:
            raise BadRequest(431, f"more than {MAX_HEADERS} header lines")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "the request line is not ASCII") from None
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/"):
        raise BadRequest(400, "malformed request line")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest(505, f"{version[:20]} is not served (HTTP/1.0 and HTTP/1.1 are)")
    for raw in lines[1:]:
        name, colon, value = raw.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "malformed header line")
        key = name.strip().lower()
        if key == b"transfer-encoding" or (key == b"content-length" and value.strip() not in (b"0", b"")):
            raise BadRequest(400, "a request body is not accepted here")
    return method, target.split("?", 1)[0].split("#", 1)[0]


class StatusServer:
    """The status page's HTTP server on the running asyncio loop (asyncio streams, no dependency)."""

    def __init__(self, snapshot: Callable[[], Dict[str, Any]], host: str, port: int, *,
                 min_interval: float = MIN_INTERVAL, max_connections: int = MAX_CONNECTIONS,
                 head_timeout: float = HEAD_TIMEOUT, write_timeout: float = WRITE_TIMEOUT,
                 max_rate: float = MAX_RATE):
        self.snapshot = snapshot
        self.host, self.port = host, int(port)
        self.min_interval = float(min_interval)
        self.max_connections = int(max_connections)
        self.head_timeout, self.write_timeout = float(head_timeout), float(write_timeout)
        self.max_rate = float(max_rate)
        self._tokens, self._tokens_at = self.max_rate, time.monotonic()
        self._server: Optional[asyncio.AbstractServer] = None
        self._writers: set = set()              # connections being served
        self._refusing: set = set()             # connections being told 503
        self._json: Optional[bytes] = None
        self._json_at = -math.inf
        self._failure_logged = False

    @property
    def url(self) -> str:
        return url_of(self.host, self.port)

    async def start(self) -> None:
        """Listen (OSError: the address cannot be used)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD_BYTES,
                                                  reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers) + list(self._refusing):
                w.transport.abort()
            await self._server.wait_closed()
            self._server = None

    # -- answers -----------------------------------------------------------------------------------
    def json_bytes(self) -> bytes:
        """The latest snapshot as JSON, rebuilt at most every ``min_interval`` seconds."""
        now = time.monotonic()
        if self._json is None or now - self._json_at >= self.min_interval:
            try:
                body = json.dumps(self.snapshot(), separators=(",", ":"), allow_nan=False).encode()
            except Exception as e:  # a bug here must cost the page, never the run
                if not self._failure_logged:
                    self._failure_logged = True
                    event("status_failed", f"status page: cannot build the snapshot ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})", logging.WARNING)
                if self._json is None:
                    raise
                body = self._json
            self._json, self._json_at = body, now
        return self._json

    def answer(self, method: str, path: str) -> bytes:
        if method not in ("GET", "HEAD"):
            return response(405, b"only GET and HEAD are served\n", extra=(("Allow", "GET, HEAD"),))
        if path in ("/", "/index.html"):
            body, ctype = PAGE, "text/html; charset=utf-8"
        elif path == "/status.json":
            try:
                body, ctype = self.json_bytes(), "application/json"
            except Exception:
                return response(500, b"the status snapshot failed; see the hub's log\n", head=method == "HEAD")
        else:
            return response(404, b"not found: this server has / and /status.json\n", head=method == "HEAD")
        return response(200, body, ctype, head=method == "HEAD")

    def _take_token(self) -> bool:
        """Token bucket: at most ``max_rate`` answers per second on average (bursts of as many)."""
        now = time.monotonic()
        self._tokens = min(self.max_rate, self._tokens + (now - self._tokens_at) * self.max_rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        busy = len(self._writers) >= self.max_connections
        if busy or not self._take_token():
            if len(self._refusing) >= self.max_connections * 4:  # a flood: not even a 503
                writer.transport.abort()
                return
            self._refusing.add(writer)
            why = b"too many connections" if busy else b"too many requests"
            try:
                writer.write(response(503, why + b"; try again\n", extra=(("Retry-After", "2"),)))
                await self._linger(reader, writer)  # a few hundred bytes: the socket buffer takes them at once
            except Exception:
                writer.transport.abort()
            finally:
                self._refusing.discard(writer)
            return
        self._writers.add(writer)
        try:
            try:
                method, path = await asyncio.wait_for(read_request_head(reader), self.head_timeout)
                out = self.answer(method, path)
            except asyncio.TimeoutError:
                out = response(408, f"the request head did not arrive within {self.head_timeout:g} s\n".encode())
            except BadRequest as e:
                out = response(e.status, (str(e) + "\n").encode())
            except (ClientGone, ConnectionError):
                return
            writer.write(out)
            await asyncio.wait_for(writer.drain(), self.write_timeout)
            await self._linger(reader, writer)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            writer.transport.abort()  # a client that does not take its answer is cut off
        except Exception as e:  # never let one connection's surprise reach the loop's exception handler
            writer.transport.abort()
            event("status_failed", f"status page: a request failed ({type(e).__name__})", logging.DEBUG)
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard what the client still sends (bounded) until it closes: closing
        a socket with unread bytes sends a reset, which can destroy the answer before it is read."""
        if writer.can_write_eof():
            writer.write_eof()

        async def discard() -> None:
            left = LINGER_BYTES
            while left > 0:
                chunk = await reader.read(min(left, 4096))
                if not chunk:
                    break
                left -= len(chunk)
        try:
            await asyncio.wait_for(discard(), LINGER_S)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        writer.close()


def response(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", head: bool = False,
             extra: Tuple[Tuple[str, str], ...] = ()) -> bytes:
    headers = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Type: {ctype}",
               f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close",
               "X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer", f"Content-Security-Policy: {CSP}"]
    headers += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


async def start_status(address: str, run, say: Optional[Callable[[str], None]] = None):
    """Serve ``run``'s status at ``address`` (ADDRESS:PORT); returns (server, events) to close later.

    ValueError (bad address) or OSError (cannot listen) with a one-line reason.
    """
    host, port = parse_status_address(address)
    events = RecentEvents().attach()
    server = StatusServer(StatusView(run, events).snapshot, host, port)
    try:
        await server.start()
    except OSError as e:
        events.detach()
        raise OSError(e.errno, f"cannot serve the status page on {address}: {e.strerror or e}") from None
    where = "this machine only" if host.startswith("127.") or host in ("localhost", "::1") else "the network"
    event("status", f"status page: {server.url} (read-only, {where}; /status.json for scripts)",
          fields={"url": server.url})
    if say is not None:
        say(server.url)
    return server, events


# ---------------------------------------------------------------------------------------------
STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:10px 18px;display:flex;flex-wrap:wrap;gap:6px 22px;align-items:baseline}
header h1{font-size:18px;margin:0 12px 0 0}
.big{font-size:22px;font-weight:600}
.label{opacity:.75;font-size:12px;margin-right:4px}
main{padding:12px 18px;display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:14px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 12px;min-width:0}
section h2{font-size:14px;margin:0 0 8px 0;color:#1d3557}
.wide{grid-column:1/-1}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{color:#56606b;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.st{font-weight:600;padding:1px 6px;border-radius:8px;white-space:nowrap}
.st-training{background:#d9f2e0;color:#13652e}.st-idle{background:#e6eefb;color:#214c8f}
.st-gone{background:#f1f1f1;color:#666}.st-not-used{background:#fde8e4;color:#9b2c12}
.why{color:#56606b;font-size:12px}
.phase-training{color:#9ff0b5}.phase-waiting{color:#ffe08a}.phase-stopping,.phase-failed{color:#ffb3a6}
#plot{width:100%;height:280px}
.axis{stroke:#9aa3ad;stroke-width:1}.grid{stroke:#eef0f3;stroke-width:1}
.tick{font-size:11px;fill:#56606b}
.acc{fill:none;stroke:#1f77b4;stroke-width:2}.loss{fill:none;stroke:#d62728;stroke-width:1.5;stroke-dasharray:4 3}
.target{stroke:#2ca02c;stroke-width:1;stroke-dasharray:6 4}
.legend{font-size:12px}
button{font:inherit;font-size:12px;border:1px solid #b8c0c9;background:#fff;border-radius:4px;padding:1px 8px;cursor:pointer}
button.on{background:#1d3557;color:#fff;border-color:#1d3557}
ul.events{list-style:none;margin:0;padding:0;font:12px/1.45 ui-monospace,Menlo,Consolas,monospace;max-height:260px;overflow:auto}
.lv-warning{color:#9b5a00}.lv-error{color:#b00020}
#conn{font-size:12px;opacity:.85}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 10px;margin:0;font-size:13px}
dt{color:#56606b}dd{margin:0}
@media (max-width:900px){main{grid-template-columns:1fr}}
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
let xAxis = "time", last = null;
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text); return e; }
function pct(x) { return x === null || x === undefined ? "\u2013" : (100 * x).toFixed(2) + " %"; }
function bytes(n) { if (n === null || n === undefined) return "\u2013"; const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; } return (i ? n.toFixed(1) : n) + " " + u[i]; }
function dur(s) { if (s === null || s === undefined) return "\u2013"; s = Math.round(s);
  if (s < 60) return s + " s"; const m = Math.floor(s / 60); if (m < 60) return m + " min " + (s % 60) + " s";
  return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min"; }
function num(x, d) { return x === null || x === undefined ? "\u2013" : Number(x).toFixed(d); }
function setText(id, t) { $(id).textContent = t; }
function svg(tag, attrs, text) { const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; }

function niceTicks(lo, hi, n) { if (!(hi > lo)) { hi = lo + 1; } const raw = (hi - lo) / n;
  const p = Math.pow(10, Math.floor(Math.log10(raw))); const f = raw / p;
  const step = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p; const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) out.push(v); return out; }

function drawPlot(s) {
  const plot = $("plot"); while (plot.firstChild) plot.removeChild(plot.firstChild);
  const W = plot.clientWidth || 640, H = plot.clientHeight || 280, L = 46, R = 46, T = 26, B = 30;
  plot.setAttribute("viewBox", "0 0 " + W + " " + H);
  const xi = xAxis === "time" ? 1 : 0, pts = s.curve;
  const xs = pts.map(p => p[xi]); let x0 = xs.length ? Math.min(...xs) : 0, x1 = xs.length ? Math.max(...xs) : 1;
  if (x1 <= x0) x1 = x0 + 1;
  const losses = pts.map(p => p[3]).filter(v => v !== null && isFinite(v));
  const lmax = losses.length ? Math.max(...losses) * 1.05 || 1 : 1;
  const X = v => L + (v - x0) / (x1 - x0) * (W - L - R), YA = a => T + (1 - a) * (H - T - B), YL = l => T + (1 - l / lmax) * (H - T - B);
  for (const a of [0, 0.2, 0.4, 0.6, 0.8, 1.0]) {
    plot.appendChild(svg("line", {x1: L, x2: W - R, y1: YA(a), y2: YA(a), class: "grid"}));
    plot.appendChild(svg("text", {x: L - 6, y: YA(a) + 4, "text-anchor": "end", class: "tick"}, (a * 100).toFixed(0) + "%"));
    plot.appendChild(svg("text", {x: W - R + 6, y: YA(a) + 4, class: "tick"}, (a * lmax).toPrecision(2)));
  }
  for (const v of niceTicks(x0, x1, 6)) {
    plot.appendChild(svg("line", {x1: X(v), x2: X(v), y1: H - B, y2: H - B + 4, class: "axis"}));
    plot.appendChild(svg("text", {x: X(v), y: H - B + 16, "text-anchor": "middle", class: "tick"},
      xAxis === "time" ? dur(v) : String(Math.round(v))));
  }
  plot.appendChild(svg("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis"}));
  plot.appendChild(svg("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  plot.appendChild(svg("text", {x: (L + W - R) / 2, y: H - 2, "text-anchor": "middle", class: "tick"},
    xAxis === "time" ? "run time" : "model version"));
  if (s.target_accuracy !== null) plot.appendChild(svg("line", {x1: L, x2: W - R, y1: YA(s.target_accuracy),
    y2: YA(s.target_accuracy), class: "target", id: "target-line"}));
  const acc = pts.filter(p => p[2] !== null).map(p => X(p[xi]).toFixed(1) + "," + YA(p[2]).toFixed(1)).join(" ");
  const loss = pts.filter(p => p[3] !== null && isFinite(p[3])).map(p => X(p[xi]).toFixed(1) + "," + YL(p[3]).toFixed(1)).join(" ");
  plot.appendChild(svg("polyline", {points: loss, class: "loss", id: "loss-line"}));
  plot.appendChild(svg("polyline", {points: acc, class: "acc", id: "acc-line", "data-points": String(pts.length)}));
  const lg = svg("g", {class: "legend"});
  lg.appendChild(svg("text", {x: L, y: 13, fill: "#1f77b4"}, "\u2014 accuracy (left axis)"));
  lg.appendChild(svg("text", {x: L + 150, y: 13, fill: "#d62728"}, "- - loss (right axis)"));
  if (s.target_accuracy !== null) lg.appendChild(svg("text", {x: L + 280, y: 13, fill: "#2ca02c"}, "- - target accuracy"));
  plot.appendChild(lg);
}

function stateClass(st) { return "st st-" + st.replace(" ", "-"); }
function reasons(r) { const k = Object.keys(r || {}); return k.length ? k.map(x => x + " " + r[x]).join(", ") : ""; }

function drawAgents(s) {
  const body = $("agents-body"); while (body.firstChild) body.removeChild(body.firstChild);
  for (const a of s.agents) {
    const tr = el("tr"); tr.setAttribute("data-agent", a.name); tr.setAttribute("data-state", a.state);
    const name = el("td"); name.appendChild(el("div", "", a.name)); name.appendChild(el("div", "why", a.address));
    tr.appendChild(name);
    const st = el("td"); st.appendChild(el("span", stateClass(a.state), a.state)); if (a.why) st.appendChild(el("div", "why", a.why));
    tr.appendChild(st);
    tr.appendChild(el("td", "n", a.tasks)); tr.appendChild(el("td", "n", a.accepted));
    const rj = el("td", "n", a.rejected); if (a.rejected) rj.appendChild(el("div", "why", reasons(a.rejected_by_reason)));
    tr.appendChild(rj);
    tr.appendChild(el("td", "n", num(a.mean_staleness, 2)));
    tr.appendChild(el("td", "n", bytes(a.bytes_in) + " / " + bytes(a.bytes_out)));
    const budget = el("td", "n", bytes(a.memory_budget));
    if (a.tier !== null && a.tier !== undefined) budget.appendChild(el("div", "why", "tier " + a.tier));
    tr.appendChild(budget);
    tr.appendChild(el("td", "n", a.last_seen_s_ago === null ? "\u2013" : dur(a.last_seen_s_ago) + " ago"));
    body.appendChild(tr);
  }
  setText("agents-more", s.agents_left_off ? "and " + s.agents_left_off + " more not listed" : "");
}

function drawFacts(s) {
  const dl = $("facts"); while (dl.firstChild) dl.removeChild(dl.firstChild);
  const add = (k, v) => { dl.appendChild(el("dt", "", k)); dl.appendChild(el("dd", "", v)); };
  const u = s.subset, t = s.totals;
  if (u.chosen) {
    add("model", u.model + " \u00b7 " + u.strategy + " \u00b7 K = " + u.buffer);
    add("subset", u.described);
    add("trained", u.trainable_params.toLocaleString() + " of " + u.params.toLocaleString() + " parameters (" +
        (100 * u.trainable_params / Math.max(1, u.params)).toFixed(1) + " %)");
    add("memory", bytes(u.predicted_bytes) + " predicted per device at batch " + u.batch_size +
        "; smallest budget M_min " + bytes(u.m_min));
    if (u.tiers) add("tiers", u.tiers.map((t, i) => "tier " + i + ": " + t.trainable_params.toLocaleString() +
        " parameters, " + bytes(t.predicted_bytes)).join("; "));
  } else {
    add("subset", "chosen when enough agents have joined; " + u.needed_what + " needs " + bytes(u.needed_bytes));
  }
  add("updates", t.accepted + " accepted, " + t.merged_updates + " merged, " + t.buffered + " buffered, " +
      t.in_flight + " in flight, " + t.tasks_issued + " tasks issued");
  add("rejected", t.rejected ? t.rejected + " (" + reasons(t.rejected_by_reason) + ")" : "none");
  add("staleness", num(t.mean_staleness, 2) + " versions on average");
  add("traffic", bytes(t.bytes_in) + " in, " + bytes(t.bytes_out) + " out");
}

function drawEvents(s) {
  const ul = $("events"); while (ul.firstChild) ul.removeChild(ul.firstChild);
  for (const e of s.events.slice().reverse()) {
    const d = new Date(e.time * 1000);
    ul.appendChild(el("li", "lv-" + e.level, d.toLocaleTimeString() + "  " + e.message));
  }
}

function render(s) {
  last = s;
  document.title = "v" + s.version + " \u00b7 " + pct(s.accuracy) + " \u00b7 FTTE hub";
  document.body.setAttribute("data-version", String(s.version));
  document.body.setAttribute("data-phase", s.phase);
  const ph = $("phase"); ph.textContent = s.phase + (s.phase_detail ? ": " + s.phase_detail : ""); ph.className = "phase-" + s.phase;
  setText("version", s.version + (s.max_versions ? " / " + s.max_versions : ""));
  setText("accuracy", pct(s.accuracy));
  setText("target", s.target_accuracy === null ? "none" : pct(s.target_accuracy));
  setText("best", pct(s.best_accuracy));
  setText("elapsed", dur(s.elapsed_s));
  const e = s.eta;
  setText("eta", e.target_s !== null ? (e.target_s === 0 ? "reached" : "\u2248 " + dur(e.target_s)) : e.target_note);
  setText("eta-max", e.max_versions_s === null ? "\u2013" : "\u2248 " + dur(e.max_versions_s));
  drawPlot(s); drawAgents(s); drawFacts(s); drawEvents(s);
  setText("conn", "updated " + new Date(s.updated_unix * 1000).toLocaleTimeString() + " \u00b7 " + s.software);
}

async function poll() {
  let wait = last ? last.refresh_ms : 2000;
  try {
    const r = await fetch("status.json", {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (err) {
    setText("conn", "hub not reachable (the run may have ended): " + err.message);
    wait = 5000;
  }
  setTimeout(poll, wait);
}

for (const b of document.querySelectorAll("button[data-x]")) b.addEventListener("click", () => {
  xAxis = b.getAttribute("data-x");
  for (const o of document.querySelectorAll("button[data-x]")) o.className = o === b ? "on" : "";
  if (last) drawPlot(last);
});
window.addEventListener("resize", () => { if (last) drawPlot(last); });
poll();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


#: nothing but this page's own inline script and style, and its own /status.json
CSP = (f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(STYLE)}; connect-src 'self'; "
       f"img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>FTTE hub status</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style></head>
<body data-version="" data-phase="">
<header><h1>FTTE hub</h1>
<span><span class="label">state</span><span id="phase">loading</span></span>
<span><span class="label">version</span><span class="big" id="version">\u2013</span></span>
<span><span class="label">accuracy</span><span class="big" id="accuracy">\u2013</span></span>
<span><span class="label">target</span><span id="target">\u2013</span></span>
<span><span class="label">best</span><span id="best">\u2013</span></span>
<span><span class="label">run time</span><span id="elapsed">\u2013</span></span>
<span><span class="label">ETA to target</span><span id="eta">\u2013</span></span>
<span><span class="label">to max versions</span><span id="eta-max">\u2013</span></span>
<span id="conn">connecting\u2026</span></header>
<main>
<section><h2>Accuracy and loss <button data-x="time" class="on">by time</button> <button data-x="version">by version</button></h2>
<svg id="plot" role="img" aria-label="validation accuracy and loss of the global model"></svg></section>
<section><h2>Subset, memory and updates</h2><dl id="facts"></dl></section>
<section class="wide"><h2>Agents</h2><table><thead><tr><th>agent</th><th>state</th><th>tasks</th><th>accepted</th>
<th>rejected</th><th>staleness</th><th>bytes in / out</th><th>budget</th><th>last seen</th></tr></thead>
<tbody id="agents-body"></tbody></table><div class="why" id="agents-more"></div></section>
<section class="wide"><h2>Recent events</h2><ul class="events" id="events"></ul></section>
</main>
<script>{SCRIPT}</script>
</body></html>
""".encode("utf-8")
