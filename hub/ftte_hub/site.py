"""`ftte-hub train --site`: a site hub that trains its LAN fleet for a wide-area federation.

The hub stays up and waits on a local channel for a global model; for each one it runs an
ordinary `ftte-hub train` run over its own agents (the fleet protocol is unchanged: the agents
see a new hub run per global version), for a set number of versions, and answers with the
site's delta and its sample count. Who sends the global model is the Flower ClientApp that the
site's `flower-supernode` runs (flower_bridge.py); this module imports nothing of Flower.

The local channel is a Unix socket (mode 0600, in the site's --out folder by default) and every
connection on it is the fleet protocol's authenticated, encrypted channel (ftte_core.channel)
keyed with the site's fleet key: only a process that holds the key file can hand the hub a model.

Messages on the socket (each one frame: u32 header length, JSON header, then an .npz of arrays):

    TRAIN     {federation, version, site_versions, [site_seconds], [base_version]} + the global model
    EVALUATE  {federation, version, [base_version]}                 + the global model
    RESULT    TRAIN: {version, samples, loss, accuracy_before, accuracy, subset, ...} + "update"
              (ftte_core.update wire bytes: the int8 delta of the site's trained rows);
              EVALUATE: {version, accuracy, loss, samples}
    ERROR     {error, [need_full]}                                   one-line reason

The global model is either the whole model file ("model": modelfile bytes, graph and weights)
or, when the site already holds ``base_version``, only the rows that changed since: the
ServerApp's int8 step from the version before (``rows:KEY`` int32, ``q:KEY`` int8 levels, ``s:KEY``
float32 row scales; ``apply_step``), or for an older base the float32 rows (``rows:KEY``,
``vals:KEY``; ``downlink_arrays``).
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

import ftte_core as ft
from ftte_core.channel import Channel, ChannelClosed, ChannelError
from ftte_core.modelfile import model_from_bytes, model_to_bytes
from ftte_core.subset import Subset
from ftte_core.update import encode_update, subset_values

from . import checkpoint as ckpt
from .logs import event

SITE_TRAIN, SITE_EVALUATE, SITE_RESULT, SITE_ERROR = 101, 102, 103, 104
SOCKET_NAME = "site.sock"
MAX_HEADER = 1 << 20
KEEP_VERSIONS = 4            # global versions a site keeps to apply row deltas to
log = logging.getLogger("ftte.site")


class SiteError(Exception):
    """A request the site cannot serve (one-line reason); ``need_full``: send the whole model."""

    def __init__(self, message: str, need_full: bool = False):
        super().__init__(message)
        self.need_full = need_full


# ---------------------------------------------------------------------------------------------
# framing: header + arrays (no pickle)
def pack(header: Dict[str, Any], arrays: Optional[Dict[str, np.ndarray]] = None) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    buf = io.BytesIO()
    np.savez(buf, **(arrays or {}))
    return struct.pack("<I", len(head)) + head + buf.getvalue()


def unpack(body: bytes) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    if len(body) < 4:
        raise SiteError("malformed message: shorter than its header length")
    (hlen,) = struct.unpack_from("<I", body)
    if hlen > MAX_HEADER or 4 + hlen > len(body):
        raise SiteError("malformed message: bad header length")
    try:
        header = json.loads(body[4:4 + hlen])
        with np.load(io.BytesIO(body[4 + hlen:]), allow_pickle=False) as z:
            # pack() stores arrays uncompressed: a compressed entry that inflates past the
            # message itself (a zip bomb from a faulty peer) is refused before it is read
            if sum(info.file_size for info in z.zip.infolist()) > len(body):
                raise SiteError("malformed message: its arrays would expand past the message's own size")
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise SiteError(f"malformed message: {e}") from None
    if not isinstance(header, dict):
        raise SiteError("malformed message: the header is not an object")
    return header, arrays


# ---------------------------------------------------------------------------------------------
# the global model down: whole, or the rows changed since a version the receiver holds
def downlink_arrays(model: ft.Model, base: Optional[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """What a site needs to rebuild ``model``: the model file, or (``base``: that site's
    parameters) per tensor the indices and float32 values of the rows that differ."""
    if base is None:
        return {"model": np.frombuffer(model_to_bytes(model), dtype=np.uint8)}
    out = {}
    for key, now in model.state().items():
        rows_now = np.asarray(now, np.float32).reshape(now.shape[0], -1) if now.ndim > 1 else now.reshape(1, -1)
        old = np.asarray(base[key], np.float32)
        rows_old = old.reshape(rows_now.shape)
        changed = np.flatnonzero(np.any(rows_now != rows_old, axis=1)).astype(np.int32)
        if changed.size:
            out[f"rows:{key}"] = changed
            out[f"vals:{key}"] = np.ascontiguousarray(rows_now[changed])
    return out


def quantise_step(new_rows: np.ndarray, old_rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """int8 levels and float32 per-row scales of ``new - old`` (rows [R, F]; round to nearest)."""
    d = new_rows.astype(np.float64) - old_rows.astype(np.float64)
    scales = (np.max(np.abs(d), axis=1) / 127.0).astype(np.float32)
    scales[~(scales > 0)] = np.float32(np.finfo(np.float32).tiny)   # a change below float32's range
    levels = np.clip(np.rint(d / scales.astype(np.float64)[:, None]), -127, 127).astype(np.int8)
    return levels, scales


def apply_step(view: np.ndarray, rows: np.ndarray, levels: np.ndarray, scales: np.ndarray) -> None:
    """view[rows] += levels x scales, in float32. The ServerApp and every site run this same
    expression, so a site's copy of a version is bit-identical to the ServerApp's (IEEE float32
    multiply and add round exactly on every platform)."""
    view[rows] = view[rows] + levels.astype(np.float32) * scales.astype(np.float32)[:, None]


def apply_downlink(arrays: Dict[str, np.ndarray], base_model: Optional[ft.Model]) -> ft.Model:
    """The inverse of ``downlink_arrays`` and of the ServerApp's int8 steps (``q:KEY`` levels,
    ``s:KEY`` scales of ``rows:KEY``; ``base_model``: the version they apply to)."""
    if "model" in arrays:
        try:
            return model_from_bytes(arrays["model"].astype(np.uint8).tobytes())
        except ValueError as e:
            raise SiteError(f"the global model does not load: {str(e).splitlines()[0]}") from None
    if base_model is None:
        raise SiteError("a row delta arrived for a version this site does not hold", need_full=True)
    model = base_model.copy()
    state = model.state()
    for name in arrays:
        if not name.startswith("rows:"):
            continue
        key = name[5:]
        step = f"q:{key}" in arrays and f"s:{key}" in arrays
        if key not in state or not (step or f"vals:{key}" in arrays):
            raise SiteError(f"the global model's delta names an unknown tensor {key!r}")
        dst = state[key]
        view = dst.reshape(dst.shape[0], -1) if dst.ndim > 1 else dst.reshape(1, -1)
        rows = arrays[name].astype(np.int64)
        vals = arrays[f"q:{key}"] if step else arrays[f"vals:{key}"].astype(np.float32)
        if rows.ndim != 1 or vals.shape != (rows.size, view.shape[1]) or rows.size and (
                rows.min() < 0 or rows.max() >= view.shape[0]) or not np.all(np.isfinite(vals)):
            raise SiteError(f"the global model's delta for {key!r} does not fit the model")
        if step:
            scales = arrays[f"s:{key}"].astype(np.float32)
            if vals.dtype != np.int8 or scales.shape != (rows.size,) or not np.all(np.isfinite(scales)):
                raise SiteError(f"the global model's int8 step for {key!r} is malformed")
            apply_step(view, rows, vals, scales)
        else:
            view[rows] = vals
        if not np.all(np.isfinite(view[rows])):
            raise SiteError(f"the global model's delta makes {key!r} non-finite")
    return model


# ---------------------------------------------------------------------------------------------
class Site:
    """What a site hub does with a global model (one request at a time)."""

    def __init__(self, cfg, key: bytes):
        from .train import load_validation

        self.cfg, self.key = cfg, key
        self.out = Path(cfg.out)
        self.val = load_validation(cfg.val_data)
        self.federation = ""
        self.globals: "OrderedDict[int, ft.Model]" = OrderedDict()   # version -> global model held
        self.lock = asyncio.Lock()
        self.stopped = ""           # a signal ended a round: the site stops after answering

    def global_model(self, header: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> Tuple[int, ft.Model]:
        fed = str(header.get("federation", ""))
        version = header.get("version")
        if not isinstance(version, int) or version < 0:
            raise SiteError("the request names no version")
        if fed != self.federation:  # another federation run: what we held is not its model
            self.federation, self.globals = fed, OrderedDict()
        base = header.get("base_version")
        model = apply_downlink(arrays, self.globals.get(base) if isinstance(base, int) else None)
        try:
            model.check_input(self.val.x[:1])
        except ValueError:
            raise SiteError(f"the global model takes inputs of shape {list(model.input_shape)}, this site's "
                            f"validation data has {list(self.val.feature_shape)}") from None
        self.globals[version] = model
        self.globals.move_to_end(version)
        while len(self.globals) > KEEP_VERSIONS:
            self.globals.popitem(last=False)
        return version, model

    async def evaluate(self, header, arrays) -> Dict[str, Any]:
        version, model = self.global_model(header, arrays)
        loss, acc = await asyncio.get_running_loop().run_in_executor(None, model.evaluate, self.val.x, self.val.y)
        return {"version": version, "have_version": version, "accuracy": float(acc), "loss": float(loss),
                "samples": int(len(self.val))}

    async def train(self, header, arrays) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        from .train import TrainError, run_train

        version, model = self.global_model(header, arrays)
        versions = header.get("site_versions") or self.cfg.max_versions
        if not isinstance(versions, int) or versions < 1:
            raise SiteError(f"site_versions must be a positive integer, got {versions!r}")
        seconds = header.get("site_seconds")
        if seconds is not None and (not isinstance(seconds, (int, float)) or not seconds > 0):
            raise SiteError(f"site_seconds must be a positive number, got {seconds!r}")
        fed = re.sub(r"[^A-Za-z0-9_.-]", "_", self.federation)[:64] or "federation"
        where = self.out / f"fed-{fed}" / f"v{version}"
        where.mkdir(parents=True, exist_ok=True)
        run_dir = where / "run"
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if not summary.get("finished"):   # fresh, or interrupted earlier (then run_train resumes it)
            onnx_path = where / "global.onnx"
            if not onnx_path.exists():
                ft.save_onnx(model, str(onnx_path))
            cfg = replace(self.cfg, model=str(onnx_path), out=str(run_dir), max_versions=versions,
                          target_accuracy=None, given=None, max_seconds=float(seconds) if seconds else None)
            event("site_round", f"global version {version}: training the site fleet for {versions} version(s)"
                  + (f" or {seconds:g} s" if seconds else "") + f" in {run_dir}")
            try:
                summary = await run_train(cfg, self.key)
            except TrainError as e:
                raise SiteError(f"the site run failed: {e}") from None
            if not summary.get("finished"):
                self.stopped = summary.get("reason", "stopped")
                raise SiteError(f"the site run stopped before its end: {summary.get('reason', '')}")
        saved = ckpt.load_checkpoint(run_dir)
        if saved is None:
            raise SiteError(f"the site run left no checkpoint in {run_dir}")
        meta, params, _ = saved
        trained = model.copy()
        trained.load_state(params)
        subset = Subset.from_dict(model, meta["subset"])
        samples = int(sum(int(a.get("samples", 0)) for a in summary.get("agents", {}).values()))
        update = encode_update(trained, subset, subset_values(model, subset), version, num_samples=max(1, samples),
                               loss=float(summary.get("loss") or 0.0) if np.isfinite(summary.get("loss") or 0.0)
                               else 0.0, bits=8, seed=version, device_id=f"site:{self.out.name}",
                               task_id=f"{fed}-v{version}")
        result = {"version": version, "have_version": version, "samples": samples,
                  "accuracy_before": float(summary.get("start_accuracy", 0.0)),
                  "accuracy": float(summary.get("accuracy", 0.0)), "site_versions": int(summary.get("version", 0)),
                  "subset": meta["subset"], "time_s": float(summary.get("time_s", 0.0)),
                  "lan_bytes": int(summary.get("bytes_in", 0)) + int(summary.get("bytes_out", 0))}
        return result, {"update": np.frombuffer(update.to_bytes(), dtype=np.uint8)}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ch = await Channel.open(reader, writer, "server", self.key, timeout=10.0)
        except (ChannelError, OSError) as e:
            event("site_refused", f"local channel: {e}", logging.WARNING)
            return
        try:
            while True:
                try:
                    kind, body = await ch.recv()
                except ChannelClosed:
                    return
                try:
                    header, arrays = unpack(body)
                    async with self.lock:
                        if kind == SITE_TRAIN:
                            head, out = await self.train(header, arrays)
                        elif kind == SITE_EVALUATE:
                            head, out = await self.evaluate(header, arrays), {}
                        else:
                            raise SiteError(f"unknown request type {kind}")
                    await ch.send(SITE_RESULT, pack(head, out))
                except SiteError as e:
                    await ch.send(SITE_ERROR, pack({"error": str(e), "need_full": e.need_full}))
                except Exception as e:  # a bug: one line back to the caller, the site goes on
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    await ch.send(SITE_ERROR, pack({"error": f"internal error: {type(e).__name__}: {msg}"}))
                if self.stopped:
                    return
        except (ChannelError, OSError) as e:
            event("site_channel", f"local channel ended: {e}", logging.WARNING)
        finally:
            ch.abort()


async def run_site(cfg, key: bytes, socket_path: Optional[str] = None) -> str:
    """Serve global models on ``socket_path`` (default OUT/site.sock) until SIGTERM/SIGINT; returns why it ended."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(socket_path) if socket_path else out / SOCKET_NAME
    site = Site(cfg, key)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise OSError(f"{path} exists and is not a socket")
        path.unlink()  # left by an earlier site process (a live one would hold --out too)
    old = os.umask(0o177)   # the socket is born 0600: only this user can even connect
    try:
        server = await asyncio.start_unix_server(site.serve, path=str(path))
    finally:
        os.umask(old)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        # a Python-level handler (not loop.add_signal_handler): a round's run_train installs its
        # own and puts this one back when it ends
        previous[sig] = signal.signal(sig, lambda s, f: loop.call_soon_threadsafe(stop.set))
    event("site_ready", f"site hub waiting for global models on {path} (fleet-key authenticated); "
          f"each trains the site fleet for {cfg.max_versions} version(s) unless the federation says otherwise")
    try:
        while not stop.is_set() and not site.stopped:
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
        await server.wait_closed()
        try:
            path.unlink()
        except OSError:
            pass
    return site.stopped or "stopped by a signal"


# ---------------------------------------------------------------------------------------------
def request(socket_path: str, key: bytes, kind: int, header: Dict[str, Any], arrays: Dict[str, np.ndarray],
            timeout: float) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """One request to a site hub (blocking; for the ClientApp). SiteError with the site's reason."""

    async def go():
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_path), 10.0)
        ch = await Channel.open(reader, writer, "client", key, timeout=10.0)
        try:
            await ch.send(kind, pack(header, arrays))
            return await ch.recv(timeout=timeout)
        finally:
            await ch.close()

    try:
        got, body = asyncio.run(go())
    except (OSError, ChannelError, asyncio.TimeoutError) as e:
        raise SiteError(f"site hub at {socket_path}: {str(e) or type(e).__name__}") from None
    head, arrays = unpack(body)
    if got == SITE_ERROR:
        raise SiteError(str(head.get("error", "the site hub refused the request")), bool(head.get("need_full")))
    if got != SITE_RESULT:
        raise SiteError(f"site hub at {socket_path}: unexpected reply type {got}")
    return head, arrays
