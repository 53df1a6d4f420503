"""`ftte-hub train`: one federated run over networked agents, from setup to exported model.

    summary = await run_train(TrainConfig(model="mlp", val_data="val.npz", out="run", peers=["pi:7850"]), key)

Setup (a fresh --out): load the validation data, build the model (zoo name: shape and classes
from the data; ONNX file: checked against the data), discover agents, wait for --min-agents, run
the subset search for the smallest budget among them, write the initial model and checkpoint.
Resume (--out holds a checkpoint): rebuild model, subset and round driver from it, replay the
journal, carry on; no new search. Then: serve tasks until --target-accuracy or --max-versions,
STOP every agent, export DIR/model.onnx and DIR/summary.json.

SIGTERM or SIGINT (``request_stop``) is a clean, resumable stop: no new tasks, in-flight updates
are waited for up to ``stop_grace`` seconds, STOP goes to every agent, model.onnx, summary.json
(``finished: false``) and the checkpoint are written, and the same command resumes.

The run's policy (what shapes its decisions: strategy, K, max versions, max staleness, learning
rates, task settings, batch size, seed) is saved in the checkpoint's ``meta["policy"]``. A resume
replays the journal under the saved policy, then applies changed flags (``APPLIED_ON_RESUME``)
from the next version with one log line each, or refuses (``FIXED_ON_RESUME``) with one line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import ftte_core as ft
from ftte_core import data as ftdata
from ftte_core import messages as M
from ftte_core.cost import predict_memory
from ftte_core.local import TaskConfig
from ftte_core.modelfile import (INT8_FORMAT_VERSION, TRAINED_INT8_FORMAT_VERSION, ModelFileError, content_hash,
                                 install_bytes, model_from_bytes, model_to_bytes, quantize_trained_rows)
from ftte_core.scheduler import RoundDriver
from ftte_core.search import (BudgetTooSmall, format_size, importance_scores, micro_batch_options, nested_tiers,
                              search_subset)
from ftte_core.strategies import MergeReport, make_strategy
from ftte_core.atomic import atomic_write
from ftte_core.subset import Subset
from ftte_core.zoo import zoo_names

from . import checkpoint as ckpt
from .coordinator import Coordinator, RunFailure
from .discovery import MdnsBrowser, parse_peer
from .fleet import Fleet, FleetSettings, Hooks
from .logs import event
from .status import parse_status_address, start_status

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL_ONNX = "model.onnx"
WAIT_REPORT_S = 5.0
WAIT_DIAGNOSE_S = 30.0     # then the waiting line says what discovery has seen
CURVE_POINTS = 2000        # (version, time, accuracy, loss) points kept for the status page; thinned beyond
# policy fields a resume may change (applied from the next version) and ones it must keep
APPLIED_ON_RESUME = ("max_versions", "max_staleness", "lr", "local_epochs", "server_lr")
FIXED_ON_RESUME = {"model": "--model", "strategy": "--strategy", "buffer": "--buffer",
                   "batch_size": "--batch-size", "seed": "--seed"}


class TrainError(Exception):
    """The run cannot start or go on (one-line reason)."""


class StoppedBeforeStart(Exception):
    """A stop signal arrived before the run had a checkpoint (nothing to resume)."""


@dataclass
class TrainConfig:
    model: str                                   # zoo name or path to an .onnx file
    val_data: str                                # .npz with x and y
    out: str                                     # output folder (checkpoint, metrics, model.onnx)
    min_agents: int = 1
    peers: Sequence[str] = ()                    # static HOST:PORT agent addresses
    buffer: int = 10                             # K: updates per merge
    max_versions: Optional[int] = 100
    target_accuracy: Optional[float] = None
    interfaces: Optional[Sequence[str]] = None   # IPv4 addresses mDNS uses (None: all)
    mdns: bool = True
    strategy: str = "ftte"
    lr: float = 0.05
    local_epochs: float = 1.0
    batch_size: int = 32                         # also the batch size of the memory cost model
    server_lr: float = 1.0
    task_timeout: float = 600.0                  # s without an UPDATE before a task is given up
    ping_interval: float = 5.0                   # s between heartbeats
    dead_after: float = 30.0                     # s of silence after which a connection is dead
    connect_timeout: float = 5.0
    wait_timeout: Optional[float] = None         # s to wait for --min-agents (None: forever)
    max_staleness: Optional[int] = None
    seed: int = 0
    model_options: Optional[Dict[str, Any]] = None   # zoo options, e.g. {"hidden": [384, 192]}
    stop_grace: float = 10.0                     # s a signalled stop waits for in-flight updates
    max_seconds: Optional[float] = None          # finish at the first merge after this much run time (site rounds)
    given: Optional[frozenset] = None            # fields set on the command line (None: all count as given)
    status: Optional[str] = None                 # ADDRESS:PORT of the read-only status page (None: off)
    update_bits: Optional[int] = None            # 8 or 4: how devices encode their deltas (ftte strategies;
                                                 # None: the strategy's default, 8)
    downlink: bool = True                        # tasks carry downlink deltas to agents that take them
    downlink_bits: int = 8                       # the downlink stream's steps: int8 or packed int4
    downlink_direct: bool = True                 # direct steps from each agent's mirror when smaller
    int8_install: bool = True                    # agents that read it get the model with frozen weights int8
    base_step_budget: float = 0.0                # plain ftte's per-base step budget in mean deltas (0: off,
                                                 # the hub's default: see docs/hub.md)
    lr_decay: float = 0.0                        # ftte strategies' server-step decay in merges per agent at
                                                 # the start (0: off; docs/aggregation.md, "Server-step decay")
    agreement_damping: float = 0.0               # plain ftte's agreement damping kappa (0: off;
                                                 # docs/aggregation.md, "Agreement damping")

    def was_given(self, field: str) -> bool:
        return self.given is None or field in self.given

    def policy(self) -> Dict[str, Any]:
        """What shapes the run's decisions (saved in the checkpoint; compared on resume)."""
        return {"model": self.model, "strategy": self.strategy, "buffer": int(self.buffer),
                "max_versions": self.max_versions, "max_staleness": self.max_staleness, "lr": float(self.lr),
                "local_epochs": float(self.local_epochs), "batch_size": int(self.batch_size),
                "server_lr": float(self.server_lr), "seed": int(self.seed)}


# ---------------------------------------------------------------------------------------------
# model and data
def bits_option(bits: Optional[int]) -> Dict[str, Any]:
    """make_strategy's keyword for --update-bits (none: the strategy's default)."""
    return {} if bits is None else {"bits": int(bits)}


def budget_option(strategy: str, budget: Optional[float]) -> Dict[str, Any]:
    """make_strategy's keyword for --base-step-budget: plain ftte (and its ablations) only; None:
    the strategy's own default. 0 turns the budget off."""
    if budget is None or not str(strategy).startswith("ftte") or strategy == "ftte-tiered":
        return {}
    return {"base_step_budget": float(budget)}


def agreement_option(strategy: str, kappa: Optional[float]) -> Dict[str, Any]:
    """make_strategy's keyword for --agreement-damping: plain ftte (and its ablations) only; None
    or 0: off."""
    if not kappa or not str(strategy).startswith("ftte") or strategy == "ftte-tiered":
        return {}
    return {"agreement_damping": float(kappa)}


def decay_option(strategy: str, merges: Optional[float]) -> Dict[str, Any]:
    """make_strategy's keyword for the server-step decay (ftte strategies; None or 0: off), in merges."""
    if not merges or not str(strategy).startswith("ftte"):
        return {}
    return {"lr_decay_merges": float(merges)}


def _finite_ge0(value: Any) -> bool:
    """A real, finite number >= 0 (a bool is not one)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _saved_number(meta: Dict[str, Any], key: str) -> float:
    """A checkpoint's number >= 0 under ``key`` (0 when absent: a run from before it existed)."""
    value = meta.get(key)
    value = 0.0 if value is None else value
    if not _finite_ge0(value):
        raise ValueError(f"{key} {value!r} is not a number >= 0")
    return float(value)


def new_run_id() -> str:
    """A fresh run's id: random, saved in the checkpoint (a resume keeps it), sent with every TASK."""
    return secrets.token_hex(8)


def load_validation(path: str) -> ftdata.Dataset:
    try:
        return ftdata.load_npz(path)
    except ftdata.DataError as e:
        raise TrainError(str(e)) from None


def build_model(spec: str, val: ftdata.Dataset, seed: int = 0, options: Optional[Dict[str, Any]] = None) -> ft.Model:
    """A zoo model shaped by the data (``options``: zoo options), or an ONNX model checked against it."""
    if spec in zoo_names():
        try:
            return ft.zoo(spec, val.feature_shape, val.num_classes, seed=seed, **(options or {}))
        except ValueError as e:
            raise TrainError(f"zoo model {spec!r} for data of shape {list(val.feature_shape)}: {e}") from None
    if not (spec.lower().endswith(".onnx") or os.path.exists(spec)):
        raise TrainError(f"--model {spec!r} is neither a zoo model ({', '.join(zoo_names())}) nor an existing .onnx file")
    if not os.path.isfile(spec):
        raise TrainError(f"model file {spec} does not exist")
    try:
        model = ft.load_model(spec)
        # The hub merges into these weights: make them owned and writable (an ONNX import may
        # hand out read-only views of the file's buffers), exactly as agents will see them.
        model = model_from_bytes(model_to_bytes(model))
    except (ValueError, OSError) as e:  # OnnxImportError is a ValueError
        raise TrainError(f"model file {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_model_fits_data(model, val, spec)
    return model


def check_model_fits_data(model: ft.Model, val: ftdata.Dataset, where: str) -> None:
    try:
        model.check_input(val.x[:1])
    except ValueError:
        shape = "x".join(str(d) for d in model.input_shape)
        raise TrainError(f"{where} takes inputs of shape {list(model.input_shape)}, but the validation data "
                         f"has samples of shape {list(val.feature_shape)} (`ftte-hub resample DATA --shape {shape} "
                         f"--out OUT.npz` resizes data to fit, docs/simulator.md)") from None
    if model.num_classes < val.num_classes:
        raise TrainError(f"{where} has {model.num_classes} outputs, but the validation data has "
                         f"{val.num_classes} classes")


def cheapest_subset_bytes(model: ft.Model, scores, batch_size: int) -> int:
    """The predicted memory of the cheapest trainable subset (with the search's levers: frozen
    weights int8, micro-batched steps): below it an agent cannot take part. Two searches, one pass
    and the smallest pass "auto" tries: a shorter pass holds no more of anything (activations,
    slots and kernel scratch shrink with it; the whole gradients do not depend on it), so no
    other micro-batch is cheaper."""
    least = []
    for micro in [0] + micro_batch_options(batch_size)[-1:]:
        try:
            least.append(search_subset(model, scores, 0, batch_size=batch_size, frozen="int8",
                                       micro_batch=micro).predicted_bytes)  # (a zero budget cannot fit)
        except BudgetTooSmall as e:
            least.append(e.minimum_bytes)
    return int(min(least))


def build_tiers(model: ft.Model, scores, smallest: Subset, frozen: str, budgets: Sequence[int],
                batch_size: int, micro_batch: int = 0) -> List[Tuple[Subset, int]]:
    """ftte-tiered's nested subsets for these agent budgets: ``[(subset, predicted bytes), ...]``,
    smallest first (``smallest``: w*, searched under M_min), at most ``search.MAX_TIERS``; each
    larger tier searched under its budget with the frozen setting and micro-batches w*'s search
    chose (the same call as the simulator's, ``ftte_core.search.nested_tiers``)."""
    full_step = int(predict_memory(model, Subset.full(model), batch_size)["total"])
    return nested_tiers(model, scores, smallest, budgets, batch_size, full_step, frozen=frozen,
                        micro_batch=micro_batch)


def tiers_meta(model: ft.Model, tiers: Sequence[Tuple[Subset, int]]) -> Dict[str, Any]:
    """What the checkpoint keeps of the tiers (a resume restores them; the summary shows them)."""
    return {"tiers": [t.to_dict() for t, _ in tiers], "tier_bytes": [int(b) for _, b in tiers],
            "tiers_described": [{"trainable_params": int(t.num_trainable(model)), "predicted_bytes": int(b),
                                 "described": t.describe(model)} for t, b in tiers]}


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a zoo name, or a file that is gone: only the same text is the same model
        return False


def saved_policy_of(meta: Dict[str, Any], cfg: TrainConfig) -> Dict[str, Any]:
    """The policy a checkpoint was written under (older checkpoints: rebuilt from what they hold)."""
    policy = meta.get("policy")
    if isinstance(policy, dict):
        return dict(policy)
    task = meta.get("task_config") or {}
    return {"model": meta.get("model_spec", cfg.model), "strategy": meta.get("strategy", cfg.strategy),
            "buffer": meta.get("buffer", cfg.buffer), "max_versions": cfg.max_versions,
            "max_staleness": cfg.max_staleness, "lr": task.get("lr", cfg.lr),
            "local_epochs": task.get("local_epochs", cfg.local_epochs),
            "batch_size": task.get("batch_size", cfg.batch_size), "server_lr": meta.get("server_lr", cfg.server_lr),
            "seed": meta.get("seed", cfg.seed)}


# ---------------------------------------------------------------------------------------------
class _Run:
    """The state of one run in this process (fresh or resumed)."""

    def __init__(self, config: TrainConfig, fleet: Fleet, hooks: Hooks):
        self.cfg = config
        self.out = Path(config.out)
        self.fleet = fleet
        self.hooks = hooks
        self.val: Optional[ftdata.Dataset] = None
        self.model: Optional[ft.Model] = None
        self.eval_model: Optional[ft.Model] = None
        self.driver: Optional[RoundDriver] = None
        self.coord: Optional[Coordinator] = None
        self.meta_base: Dict[str, Any] = {}      # what every checkpoint repeats (model hash, subset...)
        self.elapsed_before = 0.0                # run time of earlier processes (resume)
        self.t0 = time.monotonic()
        self.start_accuracy = 0.0
        self.last_accuracy = 0.0
        self.last_loss = float("nan")
        self.best_accuracy = 0.0
        self.metrics_versions: set = set()
        self.curve: List[List[float]] = []       # [version, time_s, accuracy, loss] per merge (status page)
        self.finished = asyncio.Event()
        self.finish_reason = ""
        self.fatal = ""
        self.signalled = ""                      # the signal that asked for a clean, resumable stop
        self.browser: Optional[MdnsBrowser] = None
        self.policy: Dict[str, Any] = config.policy()
        self._merges: asyncio.Queue = asyncio.Queue()
        self._writer: Optional[asyncio.Task] = None

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.t0)

    # -- setup -------------------------------------------------------------------------------------
    async def setup_fresh(self) -> None:
        cfg = self.cfg
        model = build_model(cfg.model, self.val, seed=cfg.seed, options=cfg.model_options)
        def build_strategy(decay_merges: Optional[float] = None):
            return make_strategy(cfg.strategy, buffer_size=cfg.buffer, server_lr=cfg.server_lr,
                                 **bits_option(cfg.update_bits), **budget_option(cfg.strategy, cfg.base_step_budget),
                                 **agreement_option(cfg.strategy, cfg.agreement_damping),
                                 **decay_option(cfg.strategy, decay_merges))

        strategy = build_strategy()
        scores = None
        if strategy.sparse:
            scores = importance_scores(model, self.val.x, self.val.y, seed=cfg.seed)
            floor = cheapest_subset_bytes(model, scores, cfg.batch_size)
        else:
            floor = int(predict_memory(model, Subset.full(model), cfg.batch_size)["total"])
        # While waiting, an agent counts only if it can take part: its budget fits the cheapest
        # subset and its data fits the model. The search then uses the budgets of those agents.
        f = self.fleet
        f.model_input_shape, f.model_classes = tuple(model.input_shape), int(model.num_classes)
        f.needed_bytes, f.needed_what = floor, "the cheapest trainable subset"
        agents = await self.wait_for_agents()
        self._warn_about_classes(model)
        if cfg.lr_decay and strategy.sparse:
            # in merges: --lr-decay per agent, for the agents the run starts with (fixed for the run)
            strategy = build_strategy(cfg.lr_decay * len(agents))
            event("lr_decay", f"server-step decay: the step at merge v is scaled by 1/sqrt(1 + v/"
                  f"{strategy.lr_decay_merges:g}) ({cfg.lr_decay:g} merges x {len(agents)} agents)",
                  fields={"lr_decay_merges": strategy.lr_decay_merges})
        m_min = min(int(f.infos[a]["memory_budget"]) for a in agents)
        who = min(agents, key=lambda a: int(f.infos[a]["memory_budget"]))
        if strategy.sparse:
            try:
                result = search_subset(model, scores, m_min, batch_size=cfg.batch_size, frozen="auto")
            except BudgetTooSmall as e:  # cannot happen for agents that passed the floor; kept as a guard
                raise TrainError(f"the smallest usable agent budget, {format_size(m_min)} ({f.infos[who]['name']}), "
                                 f"is too small: the cheapest subset needs {format_size(e.minimum_bytes)}") from None
            subset, needed, frozen = result.subset, int(result.predicted_bytes), result.frozen
            micro = result.micro_batch
            described = result.describe() + result.levers()
        else:
            subset, frozen, micro = Subset.full(model), "float32", 0
            needed = int(predict_memory(model, subset, cfg.batch_size)["total"])
            described = "the full model"
        event("subset", f"subset for M_min {format_size(m_min)} ({self.fleet.infos[who]['name']}): {described}; "
              f"{subset.num_trainable(model):,}/{model.num_params():,} parameters trained, predicted memory "
              f"{format_size(needed)} at batch size {cfg.batch_size}",
              fields={"m_min": m_min, "trainable": subset.num_trainable(model), "params": model.num_params(),
                      "predicted_bytes": needed, "batch_size": cfg.batch_size})
        tiers = None
        if hasattr(strategy, "set_tiers"):  # ftte-tiered: nested subsets, one per budget tier of these agents
            tiers = build_tiers(model, scores, subset, frozen, [int(f.infos[a]["memory_budget"]) for a in agents],
                                cfg.batch_size, micro)
            strategy.set_tiers([t for t, _ in tiers], [b for _, b in tiers])
            for i, (sub, nbytes) in enumerate(tiers):
                event("tier", f"tier {i}: {sub.num_trainable(model):,} parameters, predicted memory "
                      f"{format_size(nbytes)}: {sub.describe(model)}",
                      fields={"tier": i, "trainable": sub.num_trainable(model), "predicted_bytes": nbytes})
        if strategy.sparse and frozen == "int8" and cfg.int8_install:
            # the trained rows start at their int8 round trip, so the install carries them int8 and
            # exactly (model file version 4): every file of the run is written from here on, and the
            # hub's values, the downlink's origin and every device's start agree bit for bit
            before = model.evaluate(self.val.x, self.val.y)[1]
            n = quantize_trained_rows(model, [t for t, _ in tiers] if tiers is not None else [subset])
            after = model.evaluate(self.val.x, self.val.y)[1]
            event("quantised_start", f"the {n:,} trained weights start at their int8 round trip (per row): "
                  f"start accuracy {before:.4f} -> {after:.4f}",
                  fields={"values": n, "accuracy_before": before, "accuracy_after": after})
        self._clear_leftovers()
        blob = model_to_bytes(model)
        atomic_write(self.out / ckpt.INITIAL_MODEL, lambda f: f.write(blob))
        task_cfg = TaskConfig(lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, frozen=frozen,
                              micro_batch=micro)
        self.meta_base = {
            "format": ckpt.FORMAT, "model_hash": content_hash(blob), "model_name": model.name,
            "model_spec": cfg.model, "strategy": strategy.name, "buffer": strategy.buffer_size,
            "server_lr": strategy.server_lr, "task_config": task_cfg.as_dict(), "subset": subset.to_dict(),
            "needed_bytes": needed, "m_min": m_min, "seed": cfg.seed, "subset_described": described,
            "update_bits": int(strategy.bits),
            "base_step_budget": getattr(strategy, "base_step_budget", None) or 0.0,
            "lr_decay_merges": getattr(strategy, "lr_decay_merges", None) or 0.0,
            "agreement_damping": getattr(strategy, "agreement_damping", None) or 0.0,
        }
        if tiers is not None:
            self.meta_base.update(tiers_meta(model, tiers))
        self.meta_base["run_id"] = run_id = new_run_id()
        self.meta_base["task_prefix"] = f"{run_id[:8]}-"  # task ids unique across runs
        self._make_driver(model, subset, strategy, task_cfg, blob)
        self.last_loss, self.start_accuracy = model.evaluate(self.val.x, self.val.y)
        self.last_accuracy = self.best_accuracy = self.start_accuracy
        self.add_curve_point(0, self.elapsed, self.start_accuracy, self.last_loss)
        self._save_checkpoint_now()
        self.coord.open_journal()


    def _clear_leftovers(self) -> None:
        """A fresh run in a folder without a checkpoint: journals and metrics there belong to no run."""
        self._drop_journals(1 << 62)
        stale = [n for n in (METRICS, SUMMARY, MODEL_ONNX) if (self.out / n).exists()]
        for name in stale:
            os.replace(self.out / name, self.out / (name + ".old"))
        if stale:
            event("stale_outputs", f"{self.out} had no checkpoint but {', '.join(stale)}: starting afresh, "
                  f"kept them as *.old", logging.WARNING)

    def setup_resume(self, meta: Dict[str, Any], params: Dict[str, np.ndarray], buffer: List[bytes]) -> None:
        cfg = self.cfg
        try:
            blob = (self.out / ckpt.INITIAL_MODEL).read_bytes()
        except OSError as e:
            raise TrainError(f"cannot resume from {self.out}: {ckpt.INITIAL_MODEL} is unreadable ({e.strerror})") from None
        if content_hash(blob) != meta.get("model_hash"):
            raise TrainError(f"cannot resume from {self.out}: {ckpt.INITIAL_MODEL} does not match the checkpoint's model hash")
        try:
            model = model_from_bytes(blob)
            model.load_state(params)
            check_model_fits_data(model, self.val, f"the checkpointed model in {self.out}")
            saved_bits = meta.get("update_bits")  # absent in checkpoints from before --update-bits: the default
            # absent in checkpoints from before the budget, the decay or the damping: those runs ran
            # without it
            saved_budget, saved_decay, saved_kappa = (
                _saved_number(meta, k) for k in ("base_step_budget", "lr_decay_merges", "agreement_damping"))
            strategy = make_strategy(meta["strategy"], buffer_size=int(meta["buffer"]), server_lr=float(meta["server_lr"]),
                                     **bits_option(saved_bits if saved_bits in (4, 8) else None),
                                     **budget_option(meta["strategy"], saved_budget),
                                     **decay_option(meta["strategy"], saved_decay),
                                     **agreement_option(meta["strategy"], saved_kappa))
            subset = Subset.from_dict(model, meta["subset"])
            task_cfg = TaskConfig.from_dict(meta["task_config"])
            if hasattr(strategy, "set_tiers"):  # the tiers chosen at the start, as they were
                if not isinstance(meta.get("tiers"), list):
                    raise ValueError("an ftte-tiered run without its tiers")
                strategy.set_tiers([Subset.from_dict(model, t) for t in meta["tiers"]],
                                   [int(b) for b in meta["tier_bytes"]])
        except (ModelFileError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"cannot resume from {self.out}: the checkpoint is inconsistent ({e})") from None
        self.meta_base = {k: meta[k] for k in ("format", "model_hash", "model_name", "model_spec", "strategy", "buffer",
                                               "server_lr", "task_config", "subset", "needed_bytes", "m_min", "seed",
                                               "subset_described", "run_id", "task_prefix", "update_bits",
                                               "base_step_budget", "lr_decay_merges", "agreement_damping",
                                               "tiers", "tier_bytes",
                                               "tiers_described")
                          if k in meta}
        if not isinstance(self.meta_base.get("run_id"), str) or not M.RUN_ID_RE.fullmatch(self.meta_base["run_id"]):
            # a checkpoint from before run ids: its journal replays task ids without a prefix
            self.meta_base["run_id"], self.meta_base["task_prefix"] = new_run_id(), ""
            event("run_id", f"resuming: the checkpoint has no run id; this run is now {self.meta_base['run_id']}",
                  logging.WARNING)
        saved_policy = saved_policy_of(meta, cfg)
        changes = self._policy_changes(saved_policy)
        self.policy = dict(saved_policy)       # the journal replays under the policy it was written with
        self._make_driver(model, subset, strategy, task_cfg, blob, agents=dict(meta.get("agents", {})))
        try:
            self.driver.load_state_dict({"meta": meta["driver"], "buffer": buffer})
        except (ValueError, KeyError, TypeError) as e:
            raise TrainError(f"cannot resume from {self.out}: {e}") from None
        transport = meta.get("transport") or {}
        self.fleet.bytes_before = (int(transport.get("bytes_in", 0)), int(transport.get("bytes_out", 0)))
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))
        self.start_accuracy = float(meta.get("start_accuracy", 0.0))
        self.last_accuracy = float(meta.get("last_accuracy", 0.0))
        self.best_accuracy = float(meta.get("best_accuracy", 0.0))
        v0 = self.driver.version
        self._read_metrics_versions()
        replayed = 0
        self.coord.on_merge = self._merged_in_replay
        try:
            for v in ckpt.journal_versions(self.out):
                if v >= v0:
                    replayed += self.coord.replay(v)
        except (ckpt.CheckpointError, RunFailure) as e:
            raise TrainError(f"cannot resume from {self.out}: {e}") from None
        except OSError as e:
            raise TrainError(f"cannot resume from {self.out}: cannot read the journal ({e.strerror or e})") from None
        finally:
            self.coord.on_merge = self._merged
        self._apply_policy_changes(changes)
        self._save_checkpoint_now()
        self._drop_journals(self.driver.version + 1)
        self.coord.open_journal()
        event("resumed", f"resumed from {self.out}: version {v0}" + (f", {replayed} journaled events replayed "
              f"-> version {self.driver.version}" if replayed else "") + f", {self.driver.buffered} update(s) "
              f"buffered, subset {self.meta_base.get('subset_described', '')}; no new search")

    def _policy_changes(self, saved: Dict[str, Any]) -> Dict[str, Any]:
        """Flags given on this command line that differ from the saved policy: refuse or return them."""
        cfg, mine = self.cfg, self.cfg.policy()
        for key, flag in FIXED_ON_RESUME.items():
            if not cfg.was_given(key) or key not in saved or str(mine[key]) == str(saved[key]):
                continue
            if key == "model":  # required on the command line: the same file by another path is the same
                if same_file(mine[key], saved[key]):
                    continue
                advice = "give the same --model to resume"
            else:
                advice = f"leave {flag} out to resume"
            raise TrainError(f"cannot resume {self.out} with {flag} {mine[key]}: the run uses {flag} "
                             f"{saved[key]} ({advice}, or use another --out)")
        return {k: mine[k] for k in APPLIED_ON_RESUME
                if cfg.was_given(k) and k in saved and mine[k] != saved[k]}

    def _apply_policy_changes(self, changes: Dict[str, Any]) -> None:
        """After the replay: the new flags take effect from the next version, one line each."""
        d = self.driver
        for key, new in changes.items():
            old = self.policy.get(key)
            if key == "max_versions":
                d.max_versions = new
            elif key == "max_staleness":
                d.max_staleness = new
            elif key == "server_lr":
                d.strategy.server_lr = float(new)
                self.meta_base["server_lr"] = float(new)
            else:  # lr, local_epochs: the task settings sent with every new task
                task_cfg = TaskConfig.from_dict(dict(d.task_config.as_dict(), **{key: new}))
                d.task_config = task_cfg
                self.meta_base["task_config"] = task_cfg.as_dict()
            self.policy[key] = new
            flag = "--" + key.replace("_", "-")
            event("resume_policy", f"resuming with {flag} {new} (was {old}), from version {d.version + 1}",
                  logging.WARNING, fields={"setting": key, "old": old, "new": new, "from_version": d.version + 1})

    def _make_driver(self, model, subset, strategy, task_cfg, blob, agents=None) -> None:
        cfg = self.cfg
        self.model = model
        self.eval_model = model.copy()
        self.driver = RoundDriver(model, subset, strategy, task_cfg, max_versions=self.policy.get("max_versions"),
                                  max_staleness=self.policy.get("max_staleness"),
                                  seed=int(self.meta_base.get("seed", cfg.seed)))
        self.coord = Coordinator(self.driver, self.out, agents)
        self.coord.on_merge = self._merged
        f = self.fleet
        f.coordinator = self.coord
        f.model_blob, f.model_hash = blob, content_hash(blob)
        f.installs = {}
        if cfg.int8_install and task_cfg.frozen == "int8":
            # from the model file, not ``model`` (a resumed run's values moved on): the same bytes
            # every time, so agents find them cached (the file holds the quantised start already:
            # nothing is quantised again)
            start = model_from_bytes(blob)
            for version in (INT8_FORMAT_VERSION, TRAINED_INT8_FORMAT_VERSION):
                f.installs[version] = []
                for tier in self.driver.tiers:
                    one = install_bytes(start, tier, task_cfg.frozen, model_format=version)
                    f.installs[version].append((one, content_hash(one)))
        f.subset_dict = self.driver.subset.to_dict()
        f.run_id = self.meta_base["run_id"]
        self.driver.task_prefix = str(self.meta_base.get("task_prefix", ""))
        f.needed_bytes = int(self.meta_base["needed_bytes"])
        f.needed_what = "this run's subset"
        f.model_input_shape, f.model_classes = tuple(model.input_shape), int(model.num_classes)

    async def wait_for_agents(self) -> List[str]:
        """The usable agents in session, once there are --min-agents of them."""
        cfg = self.cfg
        t0 = time.monotonic()
        last = -WAIT_REPORT_S
        while True:
            if self.signalled:
                raise StoppedBeforeStart()
            if self.fleet.fatal:
                raise TrainError(self.fleet.fatal)
            agents = self.fleet.usable_sessions()
            if len(agents) >= cfg.min_agents:
                return agents
            now = time.monotonic() - t0
            if cfg.wait_timeout is not None and now > cfg.wait_timeout:
                raise TrainError(f"only {len(agents)} of {cfg.min_agents} usable agents after {cfg.wait_timeout:g} s "
                                 f"({self.discovery_seen()}; check the key and --peer addresses)")
            if now - last >= WAIT_REPORT_S:
                last = now
                names = ", ".join(self.fleet.infos[a]["name"] for a in agents) or "none yet"
                seen = f"; {self.discovery_seen()}; if multicast is blocked, name agents with --peer HOST:PORT" \
                    if now >= WAIT_DIAGNOSE_S and not agents else ""
                event("waiting", f"waiting for agents: {len(agents)}/{cfg.min_agents} ({names}){seen}",
                      fields={"agents": len(agents), "min_agents": cfg.min_agents})
            try:
                await asyncio.wait_for(self.fleet.agent_joined.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _warn_about_classes(self, model: ft.Model) -> None:
        """Agents with more classes than the validation data: say what that costs, once."""
        seen = {a: int(i.get("num_classes") or 0) for a, i in self.fleet.infos.items()}
        most = max(seen.values(), default=0)
        if most <= self.val.num_classes:
            return
        names = ", ".join(sorted(self.fleet.infos[a]["name"] for a, n in seen.items() if n > self.val.num_classes))
        cost = (f"agents with more than {model.num_classes} classes are not used" if most > model.num_classes
                else "accuracy measures only the validation data's classes")
        event("val_classes", f"the validation data has {self.val.num_classes} classes, agent(s) {names} up to "
              f"{most}: {cost} (give --val-data every class)", logging.WARNING)

    def discovery_seen(self) -> str:
        """What discovery has found so far, for a person wondering why no agent joined."""
        f, cfg = self.fleet, self.cfg
        parts = []
        if cfg.mdns:
            where = ", ".join(cfg.interfaces) if cfg.interfaces else "all IPv4 interfaces"
            n = self.browser.answers if self.browser is not None else 0
            parts.append(f"mDNS on {where}: {n or 'no'} _ftte._tcp answer{'s' if n != 1 else ''}")
        else:
            parts.append("mDNS off")
        errors = sorted(f.dial_errors.items())
        if errors:
            shown = "; ".join(f"{h}:{p}: {m}" for (h, p), m in errors[:3])
            parts.append(f"{len(errors)} address(es) failing ({shown}{'; ...' if len(errors) > 3 else ''})")
        refused = sorted((f.infos[a]["name"], f.why_not_used(f.infos[a])) for a in f.sessions
                         if f.why_not_used(f.infos[a]) is not None)
        if refused:
            parts.append("not usable: " + "; ".join(f"{n} ({why})" for n, why in refused[:2])
                         + ("; ..." if len(refused) > 2 else ""))
        return ", ".join(parts)

    # -- merges ------------------------------------------------------------------------------------
    def _merged(self, report: MergeReport) -> None:
        """Right after a merge (synchronous): wake idle agents first, then evaluate and checkpoint later."""
        if self.hooks.on_merge:
            self.hooks.on_merge(report, time.perf_counter())
        self.fleet.wake()
        params = {k: v.copy() for k, v in self.model.state().items()}
        state = self.driver.state_dict()
        agents = json.loads(json.dumps(self.coord.agents))
        stats = self.driver.stats()
        stats["agents_active"] = self.fleet.active_agents()  # as at the merge, not when it is logged
        stats["transport"] = self.fleet.bytes_totals()
        self._merges.put_nowait((report, params, state, agents, stats))
        if self.driver.done:
            self._finish("max_versions", f"reached --max-versions {self.cfg.max_versions}")
        elif self.cfg.max_seconds is not None and self.elapsed >= self.cfg.max_seconds:
            self._finish("max_seconds", f"reached the time limit of {self.cfg.max_seconds:g} s")

    def _merged_in_replay(self, report: MergeReport) -> None:
        if report.version in self.metrics_versions:
            return
        loss, acc = self.model.evaluate(self.val.x, self.val.y)
        self._record_metrics(report, loss, acc, self.driver.stats(), replayed=True)

    async def process_merges(self) -> None:
        """Evaluate, log, and checkpoint merges in order (the newest snapshot wins when merges pile up)."""
        loop = asyncio.get_running_loop()
        while True:
            report, params, state, agents, stats = await self._merges.get()
            self.eval_model.load_state(params)
            loss, acc = await loop.run_in_executor(None, self.eval_model.evaluate, self.val.x, self.val.y)
            try:
                self._record_metrics(report, loss, acc, stats)
            except OSError as e:  # a run whose progress cannot be recorded stops, loudly
                self._fail(f"cannot append to {self.out / METRICS}: {e.strerror or e}")
                return
            target = self.cfg.target_accuracy
            if target is not None and acc >= target:
                self._finish("target_accuracy", f"reached --target-accuracy {target:g} (accuracy {acc:.4f})")
            if self._merges.empty():
                meta = self._meta(state, agents, transport=stats["transport"])
                write = loop.run_in_executor(None, self._write_checkpoint, meta, params, state)
                try:
                    try:
                        await asyncio.shield(write)
                    except asyncio.CancelledError:
                        # the thread cannot be stopped: let it finish, so no checkpoint write
                        # outlives run_train (a later run in this folder must not be overwritten)
                        await asyncio.wait([write])
                        raise
                except OSError as e:  # without checkpoints a crash would lose acknowledged work: stop
                    self._fail(f"cannot write the checkpoint in {self.out}: {e.strerror or e}")
                    return
            self._merges.task_done()

    async def _merges_recorded(self) -> None:
        """Wait until every merge is evaluated and checkpointed, or the merge processor has failed."""
        join = asyncio.ensure_future(self._merges.join())
        try:
            await asyncio.wait([join] + ([self._writer] if self._writer is not None else []),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            join.cancel()
        if self.fatal:
            raise TrainError(self.fatal)

    def _fail(self, reason: str) -> None:
        """The run cannot go on: it ends with this one line and a non-zero exit."""
        if not self.fatal:
            self.fatal = reason
        self.finished.set()

    def writer_ended(self, task: asyncio.Task) -> None:
        """The merge processor must never stop while the run goes on: if it failed, the run fails."""
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            self._fail(f"after a merge: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        elif not task.cancelled() and not self.finished.is_set():
            self._fail("the merge processor stopped")

    def _record_metrics(self, report: MergeReport, loss: float, acc: float, stats: Dict[str, Any],
                        replayed: bool = False) -> None:
        self.last_accuracy, self.last_loss = float(acc), float(loss)
        self.best_accuracy = max(self.best_accuracy, float(acc))
        b_in, b_out = stats.get("transport") or self.fleet.bytes_totals()
        line = {
            "version": report.version, "accuracy": round(float(acc), 6), "loss": round(float(loss), 6),
            "time_s": round(self.elapsed, 3), "unix_time": round(time.time(), 3),
            "agents_active": stats.get("agents_active", self.fleet.active_agents()), "mean_staleness": report.mean_staleness,
            "bytes_in": b_in, "bytes_out": b_out, "update_bytes_in": stats["bytes_in"],
            "merged_updates": report.num_updates, "merged_updates_total": stats["merged_updates"],
            "samples": report.num_samples, "train_loss": report.mean_loss, "update_norm": report.update_norm,
            "partial": report.partial, "staleness": report.staleness, "weights": report.weights,
            "factors": report.factors, "devices": report.device_ids, "tasks": report.task_ids, "rejected_total": stats["rejected"],
        }
        if report.tiers:  # ftte-tiered: the tier each merged update trained, in the order of "devices"
            line["tiers"] = report.tiers
        if replayed:
            line["replayed"] = True
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.metrics_versions.add(report.version)
        self.add_curve_point(report.version, line["time_s"], acc, loss)
        if self.hooks.on_metrics:
            self.hooks.on_metrics(line)
        top = self.cfg.max_versions
        event("merge", f"version {report.version}{'/' + str(top) if top else ''}  accuracy {acc:.4f}  "
              f"loss {loss:.4f}  agents {line['agents_active']}  staleness {report.mean_staleness:.2f}  "
              f"in {b_in / 1e6:.2f} MB  out {b_out / 1e6:.2f} MB" + ("  (replayed)" if replayed else ""),
              fields={k: line[k] for k in ("version", "accuracy", "loss", "time_s", "agents_active",
                                           "mean_staleness", "bytes_in", "bytes_out", "merged_updates")})

    def _read_metrics_versions(self) -> None:
        path = self.out / METRICS
        if not path.exists():
            return
        good = []
        for line in path.read_text().splitlines():
            try:
                m = json.loads(line)
                self.metrics_versions.add(int(m["version"]))
                good.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash
            try:
                self.add_curve_point(int(m["version"]), float(m["time_s"]), float(m["accuracy"]), float(m["loss"]))
            except (ValueError, KeyError, TypeError):
                pass
        atomic_write(path, lambda f: f.write("".join(l + "\n" for l in good).encode()))

    def add_curve_point(self, version: int, time_s: float, accuracy: float, loss: float) -> None:
        """Remember one point of the accuracy curve; past CURVE_POINTS every other older point goes."""
        self.curve.append([int(version), round(float(time_s), 3), round(float(accuracy), 6), round(float(loss), 6)])
        if len(self.curve) > CURVE_POINTS:
            self.curve = self.curve[:-1:2] + self.curve[-1:]

    def _finish(self, kind: str, reason: str) -> None:
        if not self.finished.is_set():
            self.finish_reason = reason
            self.finished.set()

    # -- checkpoints -------------------------------------------------------------------------------
    def _meta(self, state: Dict[str, Any], agents: Dict[str, Any], finished: bool = False,
              transport=None) -> Dict[str, Any]:
        b_in, b_out = transport if transport is not None else self.fleet.bytes_totals()
        return dict(self.meta_base, driver=state["meta"], agents=agents, elapsed_s=self.elapsed,
                    start_accuracy=self.start_accuracy, last_accuracy=self.last_accuracy,
                    best_accuracy=self.best_accuracy, version=state["meta"]["version"], finished=finished,
                    finish_reason=self.finish_reason if finished else "", policy=dict(self.policy),
                    transport={"bytes_in": int(b_in), "bytes_out": int(b_out)})

    def _write_checkpoint(self, meta, params, state) -> None:
        """In a worker thread: the checkpoint, then the journals it makes redundant."""
        ckpt.save_checkpoint(self.out, meta, params, state["buffer"])
        self._drop_journals(state["meta"]["version"])

    def _save_checkpoint_now(self, finished: bool = False) -> None:
        state = self.driver.state_dict()
        try:
            ckpt.save_checkpoint(self.out, self._meta(state, self.coord.agents, finished),
                                 self.model.state(), state["buffer"])
        except OSError as e:
            raise TrainError(f"cannot write the checkpoint in {self.out}: {e.strerror or e}") from None

    def _drop_journals(self, below: int) -> None:
        for v in ckpt.journal_versions(self.out):
            if v < below:
                try:
                    os.unlink(ckpt.journal_path(self.out, v))
                except OSError:
                    pass

    # -- the end -----------------------------------------------------------------------------------
    def request_stop(self, signame: str) -> None:
        """SIGTERM/SIGINT: a clean stop the same command resumes from (a second signal is not waited for)."""
        if self.signalled:
            return
        if self.finished.is_set():  # the run is already ending (target reached, or a failure): let it
            event("signal", f"{signame}: the run is already ending", logging.WARNING)
            return
        self.signalled = signame
        event("signal", f"{signame}: stopping (no new tasks; in-flight updates get up to {self.cfg.stop_grace:g} s); "
              f"run the same command again to resume", logging.WARNING)
        self.fleet.draining = True
        self._finish("signal", f"stopped by {signame}; run the same command to resume")

    async def _drain(self) -> None:
        """Wait (bounded) for the updates of tasks already sent; no new tasks are issued meanwhile."""
        end = time.monotonic() + self.cfg.stop_grace
        while self.fleet.in_flight() and time.monotonic() < end and not self.fatal:
            await asyncio.sleep(0.05)
        left = self.fleet.in_flight()
        if left:
            event("stop_in_flight", f"{left} task(s) still running after {self.cfg.stop_grace:g} s; their agents "
                  f"keep the updates and deliver them when the run resumes")

    async def finish(self) -> Dict[str, Any]:
        resumable = bool(self.signalled)
        if resumable:
            await self._drain()
        else:
            # Shut the driver first: a merge slipping in after the queue drained would leave a version
            # with no metrics line and a summary that does not describe the exported model.
            self.driver.shutdown()
        await self.fleet.stop(self.finish_reason or "the run is over")
        # every session has ended (or been cut): no event can reach the driver any more
        await self._merges_recorded()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, ft.save_onnx, self.model, str(self.out / MODEL_ONNX))
            loss, acc = self.model.evaluate(self.val.x, self.val.y)
            self.last_accuracy, self.last_loss = acc, loss
            self.best_accuracy = max(self.best_accuracy, acc)
            if self.coord.journal is not None:
                await self.coord.journal.close()
            # a resumable stop keeps the driver open (buffered updates included) for the next process
            self._save_checkpoint_now(finished=not resumable)
            self._drop_journals(1 << 62)  # the journal is closed and the checkpoint holds every event
            summary = self.summary(finished=not resumable)
            atomic_write(self.out / SUMMARY, lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
        except OSError as e:
            where = f" {e.filename}" if getattr(e, "filename", None) else f" in {self.out}"
            raise TrainError(f"cannot write the run's outputs{where}: {e.strerror or e}") from None
        return summary

    def summary(self, finished: bool = True) -> Dict[str, Any]:
        b_in, b_out = self.fleet.bytes_totals()   # earlier processes of a resumed run included
        st = self.driver.stats()
        agents = {aid: {k: s.get(k, 0) for k in ("name", "tasks", "accepted", "rejected", "samples", "failed")}
                  | ({"tier": s["tier"]} if "tier" in s else {})
                  | ({"not_used": True, "not_used_reason": s.get("not_used_reason", "")} if s.get("not_used") else {})
                  for aid, s in sorted(self.coord.agents.items())}
        return {
            "finished": finished, "reason": self.finish_reason, "accuracy": self.last_accuracy, "loss": self.last_loss,
            "best_accuracy": self.best_accuracy, "start_accuracy": self.start_accuracy,
            "target_accuracy": self.cfg.target_accuracy, "version": self.driver.version,
            "max_versions": self.cfg.max_versions, "time_s": round(self.elapsed, 3),
            "bytes_in": b_in, "bytes_out": b_out, "merges": st["merges"], "merged_updates": st["merged_updates"],
            "accepted": st["accepted"], "rejected": st["rejected"], "rejected_by_reason": st["rejected_by_reason"],
            "tasks_issued": st["tasks_issued"], "mean_staleness": st["mean_staleness"],
            "strategy": self.meta_base.get("strategy"), "subset": self.meta_base.get("subset_described"),
            "trainable_params": self.driver.subset.num_trainable(self.model), "params": self.model.num_params(),
            "predicted_memory_bytes": self.meta_base.get("needed_bytes"), "m_min": self.meta_base.get("m_min"),
            **({"tiers": self.meta_base["tiers_described"]} if "tiers_described" in self.meta_base else {}),
            "model_hash": self.meta_base.get("model_hash"), "run_id": self.meta_base.get("run_id"), "agents": agents,
            "outputs": {"model": str(self.out / MODEL_ONNX), "metrics": str(self.out / METRICS),
                        "summary": str(self.out / SUMMARY), "checkpoint": str(self.out / ckpt.CHECKPOINT)},
        }


# ---------------------------------------------------------------------------------------------
async def run_train(config: TrainConfig, key: bytes, hooks: Optional[Hooks] = None) -> Dict[str, Any]:
    """Run (or resume) one training run; returns the summary (also written to OUT/summary.json).

    Raises TrainError with a one-line reason when the run cannot start or go on.
    """
    hooks = hooks or Hooks()
    if config.min_agents < 1:
        raise TrainError(f"--min-agents must be >= 1, got {config.min_agents}")
    peers = []
    for p in config.peers:
        try:
            peers.append(parse_peer(p))
        except ValueError as e:
            raise TrainError(f"--peer: {e}") from None
    if not peers and not config.mdns:
        raise TrainError("no way to find agents: give --peer HOST:PORT or leave mDNS on")
    if config.status is not None:
        try:
            parse_status_address(config.status)
        except ValueError as e:
            raise TrainError(str(e)) from None
    if config.update_bits is not None and (config.update_bits not in (4, 8) or not config.strategy.startswith("ftte")):
        raise TrainError(f"--update-bits {config.update_bits}: 8 or 4, for the ftte strategies only "
                         f"(fedbuff and fedavg send float32 deltas)")
    if not _finite_ge0(config.lr_decay):
        raise TrainError(f"--lr-decay {config.lr_decay!r}: a finite number of merges per agent >= 0 (0: off)")
    if config.lr_decay and not config.strategy.startswith("ftte"):
        raise TrainError(f"--lr-decay applies to the ftte strategies, not {config.strategy}")
    if not _finite_ge0(config.agreement_damping):
        raise TrainError(f"--agreement-damping {config.agreement_damping!r}: a finite number >= 0 (0: off)")
    if config.agreement_damping and (not config.strategy.startswith("ftte") or config.strategy == "ftte-tiered"):
        raise TrainError(f"--agreement-damping applies to plain ftte and its ablations, not {config.strategy}")
    try:
        make_strategy(config.strategy, buffer_size=config.buffer, server_lr=config.server_lr,
                      **bits_option(config.update_bits))
        TaskConfig.from_dict({"lr": config.lr, "local_epochs": config.local_epochs, "batch_size": config.batch_size})
    except ValueError as e:
        raise TrainError(str(e)) from None
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create --out {out}: {e.strerror}") from None
    try:
        saved = ckpt.load_checkpoint(out)
    except ckpt.CheckpointError as e:
        raise TrainError(str(e)) from None
    if saved is not None and saved[0].get("finished"):
        m = saved[0]
        raise TrainError(f"{out} holds a finished run (version {m.get('version')}, accuracy "
                         f"{m.get('last_accuracy', 0):.4f}; see {out / SUMMARY}); use another --out to train again")

    fleet = Fleet(key, FleetSettings(ping_interval=config.ping_interval, dead_after=config.dead_after,
                                     task_timeout=config.task_timeout, connect_timeout=config.connect_timeout), hooks)
    fleet.downlink_enabled = bool(config.downlink)
    if config.downlink_bits not in (8, 4):
        raise TrainError(f"--downlink-bits must be 8 or 4, got {config.downlink_bits}")
    fleet.downlink_bits = int(config.downlink_bits)
    fleet.downlink_direct = bool(config.downlink_direct)
    run = _Run(config, fleet, hooks)
    fleet.on_fatal = run._fail
    run.val = load_validation(config.val_data)
    browser = None
    writer = None
    status = None
    loop = asyncio.get_running_loop()
    handled = _install_stop_signals(loop, run)
    try:
        if config.status is not None:  # first: an address in use fails before anything else happens
            try:
                status = await start_status(config.status, run, hooks.on_status_url)
            except OSError as e:
                raise TrainError(e.strerror or str(e)) from None
        if saved is not None:
            run.setup_resume(*saved)
        if config.mdns:
            browser = MdnsBrowser(fleet.add_address, fleet.remove_address, config.interfaces)
            run.browser = browser
            try:
                await browser.start()
            except OSError as e:
                raise TrainError(f"mDNS: cannot browse on {config.interfaces or 'all interfaces'}: {e}") from None
        for host, port in peers:
            fleet.add_address(host, port, "peer")
        if saved is None:
            try:
                await run.setup_fresh()
            except StoppedBeforeStart:
                event("stopped", f"{run.signalled} before training started; nothing to save")
                return {"finished": False, "started": False, "reason": f"stopped by {run.signalled} before the start"}
        event("start", f"training {run.meta_base.get('model_name')} with {run.meta_base.get('strategy')} "
              f"(K={run.meta_base.get('buffer')}) from version {run.driver.version}, run {run.fleet.run_id}; "
              f"stop at {'version ' + str(config.max_versions) if config.max_versions else 'no version limit'}"
              + (f" or accuracy {config.target_accuracy:g}" if config.target_accuracy is not None else ""))
        writer = run._writer = asyncio.ensure_future(run.process_merges())
        writer.add_done_callback(run.writer_ended)
        if run.driver.done:
            run._finish("max_versions", f"version {run.driver.version} is already at --max-versions")
        elif config.target_accuracy is not None and run.last_accuracy >= config.target_accuracy:
            run._finish("target_accuracy", f"accuracy {run.last_accuracy:.4f} already meets --target-accuracy")
        fleet.ready.set()
        fleet.wake()
        if hooks.on_ready:
            hooks.on_ready(fleet)
        await run.finished.wait()
        if run.fatal:
            raise TrainError(run.fatal)
        summary = await run.finish()
        word = "finished" if summary["finished"] else "stopped"
        event(word, f"{word}: {summary['reason']}; accuracy {summary['accuracy']:.4f} at version "
              f"{summary['version']} after {summary['time_s']:.1f} s; {summary['bytes_in'] / 1e6:.2f} MB in, "
              f"{summary['bytes_out'] / 1e6:.2f} MB out; wrote {out / MODEL_ONNX}, {out / SUMMARY}",
              fields={k: summary[k] for k in ("reason", "accuracy", "version", "time_s", "bytes_in", "bytes_out")})
        return summary
    except RunFailure as e:  # setup could not open its journal, or the like
        raise TrainError(str(e)) from None
    except OSError as e:  # any other local file the run needs (setup, resume): one line, never a traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else f" in {out}"
        raise TrainError(f"cannot use{where}: {e.strerror or e}") from None
    finally:
        restore_signals(loop, handled)
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if not fleet.stopping:
            await fleet.stop("the hub is shutting down", grace=2.0)
        if browser is not None:
            await browser.close()
        if status is not None:
            server, events = status
            await server.close()
            events.detach()
        if run.coord is not None and run.coord.journal is not None:
            run.coord.journal.close_now()


def _install_stop_signals(loop: asyncio.AbstractEventLoop, run: "_Run") -> Dict[int, Any]:
    """SIGTERM (what systemd sends) and SIGINT ask for a clean, resumable stop; returns those handled."""
    import signal

    handled: Dict[int, Any] = {}   # signal -> the Python-level handler to put back

    def on_signal(name: str) -> None:
        restore_signals(loop, handled)  # a second signal gets the previous behaviour: die now
        run.request_stop(name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous = signal.getsignal(sig)
            loop.add_signal_handler(sig, on_signal, sig.name)
            handled[sig] = previous
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    return handled


def restore_signals(loop: asyncio.AbstractEventLoop, handled: Dict[int, Any]) -> None:
    import signal

    for sig, previous in list(handled.items()):
        loop.remove_signal_handler(sig)
        if previous is not None:
            signal.signal(sig, previous)
    handled.clear()
