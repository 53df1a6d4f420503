"""The agent's state dir: a stable id, the model cache and the updates not yet acknowledged.

Layout (every file is written atomically: a crash leaves the old file or the new one):

    agent_id              random hex id, created once; the hub's device id for this agent
    models/<hash>.ftm     model files (``ftte_core.modelfile``) named by their SHA-256; verified
                          against the name when read, deleted when they do not match
    pending/<run>/<task>.upd
                          an UPDATE (``Update.to_bytes()``) written before it is sent, deleted
                          when the hub has acknowledged it (accepted, rejected, or dropped as
                          another run's); kept per hub run, so an update is only ever matched to
                          the run whose task it answers

``<run>`` is the hub's run id (``messages.RUN_ID_RE``: a safe file name as it is) and ``<task>``
the task id percent-encoded, so any id the hub picks is a safe file name. Files directly in
pending/ were written by agents from before run ids: no run can claim them, so they are ignored
(one log line at start) and never sent.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import List, Optional, Tuple
from urllib.parse import quote, unquote

from ftte_core.atomic import atomic_write
from ftte_core.messages import RUN_ID_RE

log = logging.getLogger("ftte_agent.state")

MODEL_SUFFIX = ".ftm"
PENDING_SUFFIX = ".upd"
MAX_CACHED_MODELS = 8          # older model files are pruned (a run uses one; a few runs may alternate)
MAX_TASK_ID_CHARS = 128
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_ID_RE = re.compile(r"[0-9a-f]{16,64}")
_CHUNK = 1 << 20


class StateError(RuntimeError):
    """The state dir cannot be used (one-line reason)."""


def default_state_dir(name: str) -> Path:
    """$XDG_STATE_HOME/ftte-agent/<name>, or ~/.local/state/ftte-agent/<name>."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ftte-agent" / name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class StateDir:
    def __init__(self, root: os.PathLike):
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.pending_dir = self.root / "pending"
        try:
            for d in (self.root, self.models_dir, self.pending_dir):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StateError(f"state dir {self.root}: not writable ({e.strerror or e})") from None
        self.agent_id = self._load_or_create_id()
        self._verified: Optional[set] = None  # model hashes checked this run (hashing is paid once per file)

    # -- identity -----------------------------------------------------------------------------
    def _load_or_create_id(self) -> str:
        path = self.root / "agent_id"
        try:
            text = path.read_text("ascii").strip()
            if _ID_RE.fullmatch(text):
                return text
            log.warning("state dir %s: agent_id file is malformed; creating a new id", self.root)
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError) as e:
            log.warning("state dir %s: cannot read agent_id (%s); creating a new id", self.root, e)
        new_id = secrets.token_hex(8)
        atomic_write(path, lambda f: f.write((new_id + "\n").encode()), mode=0o600)
        return new_id

    # -- model cache ----------------------------------------------------------------------------
    def model_path(self, model_hash: str) -> Path:
        if not _HASH_RE.fullmatch(model_hash):
            raise ValueError(f"model hash {model_hash[:80]!r} is not 64 lowercase hex digits")
        return self.models_dir / (model_hash + MODEL_SUFFIX)

    def put_model(self, model_hash: str, blob: bytes) -> None:
        """Store a model file the caller has already parsed and hashed; prunes old ones."""
        path = self.model_path(model_hash)
        atomic_write(path, lambda f: f.write(blob), mode=0o600)
        if self._verified is not None:
            self._verified.add(model_hash)
        self._prune_models(keep=path)

    def get_model(self, model_hash: str) -> Optional[bytes]:
        """The cached bytes, or None if absent; a file whose hash does not match is deleted."""
        try:
            path = self.model_path(model_hash)
        except ValueError:
            return None
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(blob).hexdigest() != model_hash:
            log.warning("model cache: %s is corrupt (hash mismatch); deleted", path.name)
            _unlink(path)
            if self._verified is not None:
                self._verified.discard(model_hash)
            return None
        os.utime(path)  # most recently used survives pruning
        return blob

    def verified_models(self) -> List[str]:
        """Hashes of the cached models. Each file is checked against its name the first time it is
        listed in this run (corrupt or misnamed ones are deleted); a task re-checks before use."""
        known = self._verified if self._verified is not None else set()
        out = []
        for path in sorted(self.models_dir.glob("*" + MODEL_SUFFIX)):
            h = path.name[:-len(MODEL_SUFFIX)]
            if h in known:
                out.append(h)
                continue
            try:
                ok = _HASH_RE.fullmatch(h) is not None and file_sha256(path) == h
            except OSError:
                ok = False
            if ok:
                out.append(h)
            else:
                log.warning("model cache: %s is corrupt or misnamed; deleted", path.name)
                _unlink(path)
        self._verified = set(out)
        return out

    def has_model(self, model_hash: str) -> bool:
        try:
            return self.model_path(model_hash).is_file()
        except ValueError:
            return False

    def _prune_models(self, keep: Path) -> None:
        files = sorted(self.models_dir.glob("*" + MODEL_SUFFIX), key=_mtime, reverse=True)
        for path in files[MAX_CACHED_MODELS:]:
            if path != keep:
                log.info("model cache: pruned %s (keeping the %d most recent)", path.name, MAX_CACHED_MODELS)
                _unlink(path)

    # -- pending updates ------------------------------------------------------------------------
    def pending_path(self, run_id: str, task_id: str) -> Path:
        if not RUN_ID_RE.fullmatch(run_id or ""):
            raise ValueError(f"run id {run_id[:80]!r} must be 1 to 64 letters, digits, '-' or '_'")
        if not task_id or len(task_id) > MAX_TASK_ID_CHARS:
            raise ValueError(f"task id must be 1..{MAX_TASK_ID_CHARS} characters, got {len(task_id)}")
        return self.pending_dir / run_id / (quote(task_id, safe="-_") + PENDING_SUFFIX)

    def put_pending(self, run_id: str, task_id: str, blob: bytes) -> Path:
        path = self.pending_path(run_id, task_id)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        atomic_write(path, lambda f: f.write(blob), mode=0o600)
        return path

    def pending(self) -> List[Tuple[str, str, Path]]:
        """(run id, task id, path) of every kept update, oldest first."""
        files = [p for p in self.pending_dir.glob("*/*" + PENDING_SUFFIX) if RUN_ID_RE.fullmatch(p.parent.name)]
        files.sort(key=lambda p: (_mtime(p), p.parent.name, p.name))
        return [(p.parent.name, unquote(p.name[:-len(PENDING_SUFFIX)]), p) for p in files]

    def legacy_pending(self) -> List[Path]:
        """Update files from agents before run ids (directly in pending/): ignored, never sent."""
        return sorted(self.pending_dir.glob("*" + PENDING_SUFFIX))

    def drop_pending(self, run_id: str, task_id: str) -> bool:
        try:
            path = self.pending_path(run_id, task_id)
        except ValueError:
            return False
        gone = _unlink(path)
        try:
            path.parent.rmdir()  # the run's last one: no empty directory per past run
        except OSError:
            pass
        return gone


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
