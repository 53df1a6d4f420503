"""`ftte-hub agents`: which agents are reachable now (mDNS and --peer), one row each.

With the fleet key every address is asked over the authenticated channel in *query* mode
(``protocol.FLAG_QUERY`` in the client's HELLO): the agent answers with one AGENT_INFO plus its
status (connected hub, tasks training) and closes. It never becomes the agent's hub session, so a
training run the agent serves is not disturbed (docs/agent.md). Without the key nothing is asked:
the rows say what the agents' mDNS TXT records say (name, id, memory budget, speed, architecture,
protocol), and --peer addresses are only checked for an open TCP port (the agent logs that as a
connection cut short; mDNS addresses are not contacted at all).

Everything is bounded: mDNS answers are collected for ``timeout`` seconds, and each address's
connect + handshake + answer takes at most ``timeout`` seconds, all addresses at once (at most
``MAX_ADDRESSES``).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ftte_core import messages as M
from ftte_core.channel import Channel, ChannelError, HandshakeCutShort
from ftte_core.protocol import FLAG_QUERY, KeyMismatch, VersionMismatch

from .discovery import MdnsBrowser
from .fleet import one_line, parse_agent_info

MAX_ADDRESSES = 256      # addresses asked at once (mDNS answers past it are ignored)
MAX_HUB_CHARS = 64

Address = Tuple[str, int]


def parse_status(body: bytes) -> Dict[str, Any]:
    """A query answer: AGENT_INFO bounded as the hub bounds it, plus the status fields, each checked."""
    info = parse_agent_info(body)
    hub = info.get("hub")
    info["hub"] = hub[:MAX_HUB_CHARS] if isinstance(hub, str) and hub.isprintable() and hub else None
    for key in ("training", "tasks_done", "tasks_failed"):
        v = info.get(key)
        info[key] = int(v) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40 else None
    for key in ("arch", "software"):
        v = info.get(key)
        info[key] = v[:64] if isinstance(v, str) and v.isprintable() else ""
    return info


async def query_agent(host: str, port: int, key: bytes, timeout: float) -> Dict[str, Any]:
    """Ask one address for its status (read-only); a one-line ``QueryError`` when it cannot answer."""
    ch: Optional[Channel] = None

    async def ask() -> Dict[str, Any]:
        nonlocal ch
        reader, writer = await asyncio.open_connection(host, port)
        ch = await Channel.open(reader, writer, "client", key, timeout=timeout, flags=FLAG_QUERY)
        msg_type, body = await ch.recv(timeout=timeout)
        if msg_type == M.ERROR:
            raise M.MessageError(f"the agent reported: {str(M.decode_json(body, msg_type).get('message', ''))[:200]}")
        if msg_type != M.AGENT_INFO:
            raise M.MessageError(f"answered {M.name(msg_type)} instead of AGENT_INFO")
        return parse_status(body)

    try:
        return await asyncio.wait_for(ask(), timeout)
    except asyncio.TimeoutError:
        raise QueryError(f"no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise QueryError("connection refused (no agent on that port)") from None
    except KeyMismatch:
        raise QueryError("wrong fleet key: the agent holds another key") from None
    except VersionMismatch as e:
        raise QueryError(one_line(e)) from None
    except HandshakeCutShort:
        raise QueryError("the agent closed the handshake (busy, or an ftte-agent too old to answer "
                         "status queries)") from None
    except ChannelError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, KeyMismatch) or "key" in str(e).lower():
            raise QueryError(f"handshake failed: {one_line(e)}") from None
        raise QueryError(one_line(e)) from None
    except M.MessageError as e:
        raise QueryError(f"unreadable answer: {one_line(e)}") from None
    except OSError as e:
        raise QueryError(e.strerror or one_line(e)) from None
    finally:
        if ch is not None:
            await ch.close()


async def port_open(host: str, port: int, timeout: float) -> Optional[str]:
    """None if something accepts TCP connections at host:port, else why not (one line)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no TCP answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused (no agent on that port)"
    except OSError as e:
        return e.strerror or one_line(e)
    writer.close()
    return None


class QueryError(Exception):
    """An address that did not answer a status query (one line)."""


def _txt_number(txt: Dict[str, str], key: str, kind: type):
    try:
        v = kind(txt[key])
    except (KeyError, ValueError):
        return None
    return v if v == v and 0 <= v < 1e15 else None   # not NaN, not absurd


def _row(address: Address, source: str) -> Dict[str, Any]:
    return {"name": None, "agent_id": None, "address": f"{address[0]}:{address[1]}", "addresses": [],
            "source": source, "arch": None, "memory_budget": None, "speed": None, "input_shape": None,
            "num_classes": None, "samples": None, "models": None, "model_hashes": None, "pending": None, "hub": None, "training": None,
            "protocol": None, "software": None, "via": None, "error": None}


def row_from_status(address: Address, source: str, info: Dict[str, Any]) -> Dict[str, Any]:
    r = _row(address, source)
    r.update(name=info["name"], agent_id=info["agent_id"], arch=info.get("arch") or None,
             memory_budget=info["memory_budget"], speed=info.get("speed"), input_shape=info.get("input_shape"),
             num_classes=info.get("num_classes"), samples=info.get("num_samples"), models=len(info["models"]),
             model_hashes=[h[:16] for h in info["models"][:32]],
             pending=info.get("pending"), hub=info.get("hub"), training=info.get("training"),
             protocol=info.get("protocol"), software=info.get("software") or None, via="query")
    return r


def row_from_txt(address: Address, txt: Dict[str, str]) -> Dict[str, Any]:
    r = _row(address, "mdns")
    budget = _txt_number(txt, "budget", int)
    r.update(name=txt.get("name") or None, agent_id=txt.get("id") or None, arch=txt.get("arch") or None,
             memory_budget=budget, speed=_txt_number(txt, "speed", float),
             protocol=_txt_number(txt, "proto", int), via="mdns")
    return r


async def survey(key: Optional[bytes], peers: Sequence[Address], interfaces: Optional[Sequence[str]],
                 timeout: float, mdns: bool = True) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(rows, notes): one row per agent (by id; an unanswered address is a row of its own)."""
    notes: List[str] = []
    sources: Dict[Address, str] = {}
    txts: Dict[Address, Dict[str, str]] = {}
    asks: Dict[Address, asyncio.Task] = {}

    def ask(addr: Address, source: str) -> None:
        if addr in sources:
            if source not in sources[addr].split("+"):
                sources[addr] += "+" + source
            return
        if len(sources) >= MAX_ADDRESSES:
            return
        sources[addr] = source
        if key is not None:
            probe = query_agent(*addr, key, timeout)
        elif source == "peer":
            probe = port_open(*addr, timeout)   # all one can learn without the key
        else:
            probe = _nothing()                  # the mDNS record says it all; do not knock
        asks[addr] = asyncio.ensure_future(_outcome(probe))

    for addr in peers:
        ask(addr, "peer")
    browser = None
    if mdns:
        def on_record(name: str, found: List[Address], txt: Dict[str, str]) -> None:
            for addr in found:
                txts[addr] = txt
                ask(addr, "mdns")
        browser = MdnsBrowser(lambda h, p, s: None, interfaces=interfaces, on_record=on_record)
        try:
            await browser.start()
        except Exception as e:  # no multicast here (a container, qemu-user): peers still work
            notes.append(f"mDNS unavailable ({one_line(e)}); only --peer addresses were asked")
            browser = None
        else:
            try:
                await asyncio.sleep(timeout)
            finally:
                await browser.close()   # no address is added past the window
    results = {addr: await t for addr, t in list(asks.items())}

    rows: Dict[str, Dict[str, Any]] = {}
    loose: List[Dict[str, Any]] = []
    for addr, (value, error) in results.items():
        source = sources[addr]
        if key is not None and error is None:
            r = row_from_status(addr, source, value)
        elif addr in txts:
            r = row_from_txt(addr, txts[addr])
            r["source"] = source
        else:
            r = _row(addr, source)
        r["error"] = error
        if key is None and error is None and addr not in txts:
            r["via"] = "tcp"      # a --peer without the key: only its open port is known
        aid = r["agent_id"]
        if aid is None or (r["error"] is not None and aid not in rows):
            r["addresses"] = [r["address"]]
            loose.append(r)
            continue
        if aid in rows:
            kept = rows[aid]
            kept["addresses"].append(r["address"])
            if r["source"] not in kept["source"].split("+"):
                kept["source"] += "+" + r["source"]
            continue
        r["addresses"] = [r["address"]]
        rows[aid] = r
    # an address that failed while another address of the same agent answered is not news
    out = list(rows.values()) + [r for r in loose if r["agent_id"] is None or r["agent_id"] not in rows
                                 or r["error"] is None]
    out.sort(key=lambda r: (r["error"] is not None, str(r["name"] or ""), r["address"]))
    if key is None and out:
        notes.append("without --key: what the mDNS records say (data, cached models, pending updates and the "
                     "connected hub need --key)")
    return out, notes


async def _nothing() -> None:
    return None


async def _outcome(coro) -> Tuple[Any, Optional[str]]:
    """(value, None) or (None, one-line error): one address never fails the survey."""
    try:
        value = await coro
    except QueryError as e:
        return None, str(e)
    except Exception as e:  # a bug in one query costs that row, not the command
        return None, f"{type(e).__name__}: {one_line(e)}"
    if value is None or isinstance(value, dict):
        return value, None
    return None, str(value)    # port_open's reason


def short_size(n: int) -> str:
    """'512 KiB', '1.5 MiB': a table cell (the JSON has the exact bytes)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} B"


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ["NAME", "ID", "ADDRESS", "ARCH", "BUDGET", "SPEED", "DATA", "CLASSES", "SAMPLES", "MODELS", "PENDING",
            "HUB"]
    lines = [head]
    errors = []
    for r in rows:
        hub = r["hub"]
        if r["training"]:
            hub = f"{hub or 'none'} (training {r['training']})"
        lines.append([
            _cell(r["name"]), _cell(r["agent_id"] and r["agent_id"][:12]),
            r["address"] + (f" +{len(r['addresses']) - 1}" if len(r["addresses"]) > 1 else ""),
            _cell(r["arch"]),
            "-" if r["memory_budget"] is None else short_size(r["memory_budget"]),
            "-" if r["speed"] is None else f"{r['speed']:.2f} GFLOP/s",
            "-" if r["input_shape"] is None else "x".join(str(d) for d in r["input_shape"]),
            _cell(r["num_classes"]), _cell(r["samples"]), _cell(r["models"]), _cell(r["pending"]),
            "-" if r["via"] != "query" else (hub or "none"),
        ])
        if r["error"] is not None:
            errors.append(f"{r['name'] or r['address']}: {r['error']}")
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    return text + ("\n" + "\n".join(errors) if errors else "")


def run_survey(key: Optional[bytes], peers: Sequence[Address], interfaces: Optional[Sequence[str]],
               timeout: float, mdns: bool = True):
    logging.getLogger("zeroconf").setLevel(logging.ERROR)
    return asyncio.run(survey(key, peers, interfaces, timeout, mdns=mdns))
