"""`ftte-agent`: serve one device of the fleet (see docs/agent.md)."""
from __future__ import annotations

from .lean import import_without_openssl, single_malloc_arena

single_malloc_arena()     # before NumPy and the kernels start their threads: see lean.py
import_without_openssl()  # before anything imports asyncio or hashlib: see lean.py

import asyncio  # noqa: E402 (after import_without_openssl on purpose)
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import List, Optional, Sequence

import click

log = logging.getLogger("ftte_agent")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,62}")  # also a directory name and an mDNS label


def _fail(msg: str) -> None:
    click.echo(f"ftte-agent: error: {msg}", err=True)
    sys.exit(2)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"t": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, "msg": record.getMessage()}, separators=(",", ":"))


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s ftte-agent %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("zeroconf").setLevel(logging.WARNING)  # its debug chatter is not our events


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ftte-fleet")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Fleet key file (from `ftte-hub keygen`).")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False),
              help="Local training data: .npz with x [N, ...] and integer labels y [N] (never sent anywhere).")
@click.option("--name", default=None, help="Agent name in logs and mDNS; default: the host name.")
@click.option("--memory-budget", default=None,
              help="Training memory this device offers, e.g. 64MiB; default: 1/4 of the available memory "
                   "(MemAvailable, or the memory cgroup's headroom if smaller), at most 1 GiB.")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="TCP port to serve on (0 = any free port; the log names it).  [default: 7850]")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Agent id, model cache and unacknowledged updates; default: "
                   "$XDG_STATE_HOME/ftte-agent/NAME or ~/.local/state/ftte-agent/NAME.")
@click.option("--slowdown", type=click.FloatRange(min=1.0), default=1.0,
              help="Make this device X times slower (straggler emulation): sleeps (X-1) x training time "
                   "after each task and divides the advertised speed by X.")
@click.option("--interface", "interfaces", multiple=True, metavar="IP",
              help="IPv4 address to serve and advertise on (repeatable); default: listen on all, "
                   "advertise every non-loopback IPv4 address.")
@click.option("--no-mdns", is_flag=True, help="Do not advertise over mDNS (the hub then needs --peer HOST:PORT).")
@click.option("--hello-timeout", type=click.FloatRange(min=0.1), default=2.0,
              help="Seconds a new connection has to send its HELLO (the handshake's first message); a "
                   "silent connection is dropped this soon, so stalled connections cannot pile up.")
@click.option("--handshake-timeout", type=click.FloatRange(min=0.1), default=10.0,
              help="Seconds a new connection has to complete the whole authenticated handshake.")
@click.option("--silence-timeout", type=click.FloatRange(min=1.0), default=60.0,
              help="Seconds without any message after which a hub connection is dropped.")
@click.option("--ping-interval", type=click.FloatRange(min=0.1), default=20.0,
              help="Seconds between the agent's heartbeats to a connected hub.")
@click.option("--max-task-steps", type=click.IntRange(min=0), default=100_000,
              help="Most training steps one task may take; a task asking for more trains this many and sends "
                   "that update (0 = no cap).")
@click.option("--max-task-seconds", type=click.FloatRange(min=0.0), default=600.0,
              help="Most seconds one task may train; training then stops after the step in progress and the "
                   "update of the steps done is sent (0 = no cap).")
@click.option("--check", is_flag=True,
              help="Check this device instead of serving: key, data, memory budget (which zoo models fit), speed, "
                   "port, mDNS multicast; one line each, exit status 1 when one FAILs.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", help="Log line format (stderr).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", help="Log verbosity.")
def main(key_path, data_path, name, memory_budget, port, state_dir, slowdown, interfaces, no_mdns,
         hello_timeout, handshake_timeout, silence_timeout, ping_interval, max_task_steps, max_task_seconds,
         check, log_format, log_level):
    """Serve one device of the FTTE fleet: advertise, accept the hub, train tasks, send deltas.

    Only encoded parameter deltas and summary numbers leave the device, over connections
    authenticated and encrypted with the fleet key. SIGTERM or Ctrl-C withdraws the mDNS
    advertisement and exits 0.
    """
    setup_logging(log_format, log_level)
    from ftte_core import messages
    from ftte_core.data import DataError, load_npz
    from ftte_core.protocol import KeyFileError, read_key
    from ftte_core.sizes import format_size

    from . import device
    from .server import Agent, AgentSettings
    from .state import StateDir, StateError, default_state_dir

    if name is not None and not NAME_RE.fullmatch(name):
        _fail(f"--name {name[:80]!r}: use 1-63 letters, digits, '.', '_', '-' or spaces, starting with a letter or digit")
    for ip in interfaces:
        if not _is_ipv4(ip):
            _fail(f"--interface {ip!r} is not an IPv4 address")
    if check:
        budget, rule = _budget(memory_budget)
        from .check import run_checks
        ok = run_checks(key_path, data_path, budget, rule, messages.DEFAULT_AGENT_PORT if port is None else port,
                        list(interfaces), mdns=not no_mdns, slowdown=slowdown, emit=click.echo)
        sys.exit(0 if ok else 1)
    try:
        key = read_key(key_path)
    except KeyFileError as e:
        _fail(str(e))
    try:
        data = load_npz(data_path)
    except DataError as e:
        _fail(str(e))
    budget, rule = _budget(memory_budget)
    name = name or device.host_name()
    try:
        state = StateDir(state_dir or default_state_dir(name))
    except StateError as e:
        _fail(str(e))
    port = messages.DEFAULT_AGENT_PORT if port is None else port

    log.info("agent %s (id %s): %d samples of shape %s, %d classes; state dir %s", name, state.agent_id, len(data),
             list(data.feature_shape), data.num_classes, state.root)
    log.info("memory budget %s (%s)", format_size(budget), rule)
    log.info("per task: at most %s steps (--max-task-steps), %s (--max-task-seconds)",
             f"{max_task_steps:,}" if max_task_steps else "unlimited",
             f"{max_task_seconds:g} s" if max_task_seconds else "no time limit")
    t0 = time.perf_counter()
    raw_speed = device.measure_speed()
    speed = raw_speed / slowdown
    log.info("speed %.2f GFLOP/s (measured %.2f in %.2f s, slowdown x%g)", speed, raw_speed,
             time.perf_counter() - t0, slowdown)

    settings = AgentSettings(key=key, data=data, name=name, state=state, memory_budget=budget, speed=speed,
                             slowdown=slowdown, arch=device.arch(), handshake_timeout=handshake_timeout,
                             hello_timeout=min(hello_timeout, handshake_timeout),
                             silence_timeout=silence_timeout, ping_interval=ping_interval,
                             max_task_steps=max_task_steps or None, max_task_seconds=max_task_seconds or None)
    agent = Agent(settings)
    models = state.verified_models()  # hashed now, not when the first hub is waiting
    kept = agent.check_pending()
    if models or kept:
        log.info("state: %d cached model(s), %d update(s) kept for the next hub connection", len(models), kept)
    try:
        asyncio.run(serve(agent, list(interfaces), port, mdns=not no_mdns))
    except ListenError as e:
        _fail(str(e))
    training = [t for t in threading.enumerate() if t.name == "ftte-train" and t.is_alive()]
    if training:
        # A task still training is abandoned (the hub times it out). Interpreter finalisation would
        # pull the thread out of the C++ kernels and abort the process, so leave without it: the
        # state dir is already consistent (every file there is written atomically and fsynced).
        log.info("stopped (abandoned the task in training)")
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    log.info("stopped")


def _budget(memory_budget: Optional[str]):
    """(bytes, the rule that set it) from --memory-budget or the device's default."""
    from ftte_core.sizes import parse_size

    from . import device

    if memory_budget is None:
        return device.default_memory_budget()
    try:
        budget = parse_size(memory_budget)
    except ValueError as e:
        _fail(f"--memory-budget: {e}")
    if budget <= 0:
        _fail("--memory-budget must be positive")
    return budget, "--memory-budget"


class ListenError(OSError):
    """The TCP port cannot be bound (one line naming the address)."""


async def serve(agent, interfaces: Sequence[str], port: int, mdns: bool) -> None:
    """Listen, advertise, and run until SIGTERM/SIGINT."""
    from .advertise import Advertiser

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    hosts = list(interfaces) or ["0.0.0.0"]
    servers: List[asyncio.base_events.Server] = []
    for host in hosts:
        # with port 0 the first bind picks the port and every other address uses the same one
        try:
            srv = await asyncio.start_server(agent.handle_connection, host=host, port=port, reuse_address=True)
        except OSError as e:
            for other in servers:
                other.close()
            reason = os.strerror(e.errno) if e.errno else str(e)  # asyncio's own text repeats the address
            raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None
        port = srv.sockets[0].getsockname()[1]
        servers.append(srv)
        log.info("listening on %s:%d", host, port)

    advertiser_task: Optional[asyncio.Task] = None
    if mdns:
        s = agent.s
        txt = {"id": agent.state.agent_id, "name": s.name, "proto": str(_protocol_version()),
               "budget": str(int(s.memory_budget)), "speed": f"{s.speed:.3f}", "arch": s.arch}
        adv = Advertiser(s.name, agent.state.agent_id, port, txt, interfaces=list(interfaces) or None)
        advertiser_task = asyncio.create_task(adv.run())
    else:
        log.info("mDNS disabled (--no-mdns): the hub must be given --peer HOST:%d", port)

    await stop.wait()
    log.info("shutting down")
    for srv in servers:
        srv.close()
    await agent.shutdown()
    agent.refusals.flush()  # a flood's last summary line
    if advertiser_task is not None:
        advertiser_task.cancel()
        try:
            await asyncio.wait_for(advertiser_task, 5.0)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass
        except Exception as e:
            log.warning("mDNS shutdown: %s", e)
    # let the cancelled sessions send their close frames
    await asyncio.sleep(0.05)


def _protocol_version() -> int:
    from ftte_core.protocol import PROTOCOL_VERSION
    return PROTOCOL_VERSION


def _is_ipv4(text: str) -> bool:
    import ipaddress
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
