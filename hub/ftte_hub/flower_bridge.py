"""Flower apps for a multi-site federation (the optional `flower` extra; docs/multi-site.md).

    client_app   run by each site's `flower-supernode`: hands a global model to the site hub
                 (`ftte-hub train --site`) over its fleet-key-authenticated Unix socket and returns
                 the site's int8 delta and sample count (train), or its validation accuracy (evaluate)
    server_app   our strategy on Flower's Message API (Grid): sends the global model to the sites,
                 merges what comes back with the hub's robust, staleness-aware rules
                 (federation.py), tracks versions, checkpoints, writes OUT/model.onnx

The Flower app (pyproject.toml with these components and the run config) is examples/multisite/.
Only this module imports flwr; nothing else in the package imports this module.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Dict, List, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ftte_core.protocol import KeyFileError, read_key

from .federation import Federation, FederationError
from .site import SITE_EVALUATE, SITE_TRAIN, SiteError, request

log = logging.getLogger("ftte.flower")

client_app = ClientApp()
server_app = ServerApp()


# ---------------------------------------------------------------------------------------------
# records <-> arrays
def _arrays_record(arrays: Dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays_of(record: ArrayRecord) -> Dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's records (arrays, configs, metrics), as Flower counts them."""
    return int(sum(rec.count_bytes() for rec in content.values()))


# ---------------------------------------------------------------------------------------------
# ClientApp: beside the site hub
def _site_request(kind: int, msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    node = context.node_config
    sock, key_path = str(node.get("site-socket", "")), str(node.get("site-key", ""))
    try:
        if not sock or not key_path:
            raise SiteError("the SuperNode needs --node-config 'site-socket=\"PATH\" site-key=\"KEYFILE\"'")
        try:
            key = read_key(key_path)
        except KeyFileError as e:
            raise SiteError(str(e)) from None
        header = {"federation": str(cfg["federation"]), "version": int(cfg["version"]),
                  "site_versions": int(cfg.get("site-versions", 0)) or None}
        if float(cfg.get("site-seconds", 0.0)) > 0:
            header["site_seconds"] = float(cfg["site-seconds"])
        if int(cfg.get("base-version", -1)) >= 0:
            header["base_version"] = int(cfg["base-version"])
        head, arrays = request(sock, key, kind, header, _arrays_of(msg.content["global"]),
                               timeout=float(cfg.get("site-timeout", 3600.0)))
    except SiteError as e:
        return Message(RecordDict({"error": ConfigRecord({"error": str(e), "need-full": bool(e.need_full)})}),
                       reply_to=msg)
    metrics = MetricRecord({k: head[k] for k in ("version", "samples", "accuracy", "accuracy_before", "loss",
                                                 "site_versions", "time_s", "lan_bytes")
                            if isinstance(head.get(k), (int, float)) and not isinstance(head.get(k), bool)})
    content = RecordDict({"metrics": metrics})
    if "update" in arrays:
        content["update"] = _arrays_record({"update": arrays["update"]})
        content["site"] = ConfigRecord({"subset": json.dumps(head["subset"], separators=(",", ":"))})
    return Message(content, reply_to=msg)


@client_app.train()
def site_train(msg: Message, context: Context) -> Message:
    return _site_request(SITE_TRAIN, msg, context)


@client_app.evaluate()
def site_evaluate(msg: Message, context: Context) -> Message:
    return _site_request(SITE_EVALUATE, msg, context)


# ---------------------------------------------------------------------------------------------
# ServerApp
def _shape(text: str):
    return tuple(int(p) for p in str(text).replace(",", "x").split("x") if p)


class _Downlink:
    """What each site holds, so a global version goes down as the rows changed since (or whole)."""

    def __init__(self, fed: Federation, federation_id: str):
        self.fed, self.federation_id = fed, federation_id
        self.holds: Dict[int, int] = {}   # node id -> global version it last confirmed

    def content(self, node: int, **config) -> RecordDict:
        base = self.holds.get(node)
        if self.fed.params_of(base) is None:
            base = -1
        arrays = self.fed.downlink(base if base >= 0 else None)
        cfg = ConfigRecord({"federation": self.federation_id, "version": self.fed.version, "base-version": base,
                            **config})
        return RecordDict({"global": _arrays_record(arrays), "config": cfg})

    def reply(self, node: int, reply: Message) -> Optional[RecordDict]:
        """The reply's content, or None (logged) for an error; keeps track of what the node holds."""
        if reply.has_error():
            log.warning("site %s: %s", node, reply.error.reason)
            return None
        content = reply.content
        if "error" in content:
            err = content["error"]
            if err.get("need-full"):
                self.holds.pop(node, None)
            log.warning("site %s: %s", node, err.get("error"))
            print(f"ftte: site {node}: {err.get('error')}", flush=True)
            return None
        v = content["metrics"].get("version")
        if isinstance(v, int):
            self.holds[node] = v
        return content


def _exchange(grid: Grid, msgs: List[Message], timeout: float, poll: float = 0.2) -> List[Message]:
    """Push and pull the replies (Grid.send_and_receive polls every 3 s: a round would wait for it)."""
    ids = set(grid.push_messages(msgs))
    replies, end = [], time.monotonic() + timeout
    while ids and time.monotonic() < end:
        got = list(grid.pull_messages(list(ids)))
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        replies += got
        if ids:
            time.sleep(poll)
    return replies


def _wait_for_sites(grid: Grid, need: int, timeout: float) -> List[int]:
    end = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= need:
            return nodes
        if time.monotonic() > end:
            raise FederationError(f"only {len(nodes)} of {need} sites connected after {timeout:g} s")
        time.sleep(0.5)


@server_app.main()
def federate(grid: Grid, context: Context) -> None:
    rc = context.run_config
    out = str(rc.get("out", "ftte-federation"))
    fed = Federation.open(out, str(rc.get("model", "mlp")), _shape(rc.get("input-shape", "1x8x8")),
                          int(rc.get("num-classes", 10)), seed=int(rc.get("seed", 0)),
                          strategy=str(rc.get("strategy", "ftte")), server_lr=float(rc.get("server-lr", 1.0)))
    rounds, min_sites = int(rc.get("num-rounds", 3)), int(rc.get("min-sites", 2))
    round_timeout, target = float(rc.get("round-timeout", 3600.0)), float(rc.get("target-accuracy", 0.0))
    site_versions, site_seconds = int(rc.get("site-versions", 5)), float(rc.get("site-seconds", 0.0))
    down = _Downlink(fed, f"{grid.run.run_id}")
    say = lambda m: print(f"ftte: {m}", flush=True)  # noqa: E731 - the ServerApp's log goes to `flwr log`
    nodes = _wait_for_sites(grid, min_sites, float(rc.get("wait-timeout", 600.0)))
    say(f"{len(nodes)} site(s); federation {down.federation_id} from version {fed.version}, {rounds} round(s) of "
        f"{site_versions} site version(s), output {out}")
    pending: Dict[str, tuple] = {}   # message id -> (node, version sent)
    for rnd in range(1, rounds + 1):
        t0 = time.monotonic()
        nodes = sorted(grid.get_node_ids())
        busy = {n for n, _ in pending.values()}
        msgs, sent = [], {}
        for n in nodes:
            if n in busy:
                continue
            content = down.content(n, **{"site-versions": site_versions, "site-seconds": site_seconds,
                                         "site-timeout": round_timeout})
            msgs.append(Message(content, dst_node_id=n, message_type="train", group_id=str(rnd)))
            sent[n] = payload_bytes(content)
        for mid, m in zip(grid.push_messages(msgs), msgs):
            pending[mid] = (m.metadata.dst_node_id, fed.version)
        want = len(pending) if int(rc.get("buffer", 0)) <= 0 else min(int(rc["buffer"]), len(pending))
        results, up, end = [], {}, time.monotonic() + round_timeout
        while pending and len(results) < want and time.monotonic() < end:
            # replies to earlier rounds' messages count too: a late site is merged with its staleness
            for reply in grid.pull_messages(list(pending)):
                if reply.metadata.reply_to_message_id not in pending:
                    continue   # not one we are waiting for (a duplicate delivery)
                node, version = pending.pop(reply.metadata.reply_to_message_id)
                content = down.reply(node, reply)
                if content is None or "update" not in content:
                    want = min(want, len(results) + len(pending))
                    continue
                up[node] = payload_bytes(content)
                try:
                    subset = json.loads(content["site"]["subset"])
                    results.append(fed.check(str(node), version, int(content["metrics"]["samples"]),
                                             content["update"]["update"].numpy().tobytes(), subset,
                                             header=dict(content["metrics"]), wan_bytes=up[node]))
                except (ValueError, KeyError) as e:
                    say(f"round {rnd}: rejected: {e}")
                    want = min(want, len(results) + len(pending))
            time.sleep(0.1)
        if not results:
            say(f"round {rnd}: no site answered within {round_timeout:g} s; the version stays {fed.version}")
            continue
        try:
            line = fed.merge(results)
        except ValueError as e:
            say(f"round {rnd}: merge refused: {e}")
            continue
        train_s = time.monotonic() - t0
        # evaluate the new version on every site's validation data (sites still training are skipped)
        busy = {n for n, _ in pending.values()}
        emsgs, esent = [], {}
        for n in sorted(grid.get_node_ids()):
            if n not in busy:
                content = down.content(n)
                emsgs.append(Message(content, dst_node_id=n, message_type="evaluate", group_id=str(rnd)))
                esent[n] = payload_bytes(content)
        acc_sum = n_sum = 0.0
        eup = {}
        for reply in _exchange(grid, emsgs, float(rc.get("evaluate-timeout", 300.0))):
            node = reply.metadata.src_node_id
            content = down.reply(node, reply)
            if content is None:
                continue
            eup[node] = payload_bytes(content)
            m = content["metrics"]
            acc_sum += float(m["accuracy"]) * int(m["samples"])
            n_sum += int(m["samples"])
        accuracy = acc_sum / n_sum if n_sum else float("nan")
        line.update(round=rnd, accuracy=accuracy, evaluated_samples=int(n_sum), train_s=round(train_s, 3),
                    round_s=round(time.monotonic() - t0, 3),
                    wan_train_down=int(sum(sent.values())), wan_train_up=int(sum(up.values())),
                    wan_eval_down=int(sum(esent.values())), wan_eval_up=int(sum(eup.values())),
                    full_model_float32=int(4 * fed.model.num_params()),
                    site_accuracy=[float(r.header.get("accuracy", float("nan"))) for r in results])
        fed.save(line)
        say(f"round {rnd}: version {fed.version} from {len(results)} site(s), accuracy {accuracy:.4f}; WAN "
            f"{line['wan_train_down']:,} B down + {line['wan_train_up']:,} B up to train, {line['wan_eval_down']:,}"
            f" + {line['wan_eval_up']:,} B to evaluate (full float32 model: {line['full_model_float32']:,} B); "
            f"{line['round_s']:.1f} s")
        if target > 0 and accuracy >= target:
            say(f"reached target accuracy {target:g}")
            break
    say(f"done: version {fed.version}; wrote {out}/model.onnx")
