"""The fleet on a virtual clock: real training, real encoded updates, simulated time.

Every device trains with the real engine on its own data and sends a real encoded update; the
same ``RoundDriver`` the networked hub uses decides what to merge and when. Only time is
simulated: a task takes

    download (bytes down / down_bps + latency)
  + compute  (training flops of that subset on that batch / device flops_per_s, x slowdown)
  + upload   (actual update bytes / up_bps + latency)

and events are processed in virtual-time order. A task's training is computed when its update
arrives (from the values of the version the task started at), so work that would never arrive
before the run ends costs nothing.
"""
from __future__ import annotations

import heapq
import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core import data as ftdata
from ftte_core.cost import predict_memory, training_flops
from ftte_core.downlink import DownlinkCounter
from ftte_core.graph import Transpose
from ftte_core.local import LocalWorker, TaskConfig
from ftte_core.modelfile import install_bytes, quantize_trained_rows
from ftte_core.scheduler import RoundDriver
from ftte_core.search import BudgetTooSmall, importance_scores, nested_tiers, search_subset
from ftte_core.strategies import FTTE, make_strategy
from ftte_core.subset import Subset
from ftte_core.update import subset_values
from ftte_core.zoo import default_shape, zoo_names

from .tools import ToolError, load_model as load_model_file


#: Input shapes of the zoo's MLPerf Tiny models (CIFAR-10 images, MFCC frames, visual wake words,
#: machine-sound features, accelerometer windows), from ``zoo.default_shape``: the simulator builds
#: them at these shapes unless ``input_shape`` says otherwise, and resamples the data to fit
#: (``data.resample_to_shape``). Any other zoo model (mlp, cnn) is built for the data's own shape.
REFERENCE_SHAPES: Dict[str, Tuple[int, ...]] = {
    name: tuple(default_shape(name)[0]) for name in zoo_names() if default_shape(name)[0] is not None}


# ---------------------------------------------------------------------------------------------
# devices
@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops_per_s: float
    down_bps: float
    up_bps: float
    memory_budget: Optional[int] = None      # bytes per training step, or:
    memory_fraction: Optional[float] = None  # a share of the simulated model's full training step
    latency_s: float = 0.005
    # Rate (per second of a task: download, training, upload) at which a working device leaves;
    # its work is lost and it comes back after rejoin_s. A rate in time, not a chance per task: a
    # chance per task made a strategy with short tasks (FTTE's small subset) lose its fleet many
    # times faster than one with long tasks, for the same devices.
    dropout_per_s: float = 0.0
    rejoin_s: float = 30.0
    weight: float = 1.0

    def budget_bytes(self, full_step_bytes: int) -> int:
        """This profile's budget for a model whose full training step needs ``full_step_bytes``."""
        if self.memory_budget is not None:
            return int(self.memory_budget)
        return int(self.memory_fraction * full_step_bytes)


def load_profiles(path: Optional[str] = None) -> Dict[str, DeviceProfile]:
    """Profiles from a JSON file ({"profiles": {name: {...}}}), or the shipped presets."""
    if path is None:
        text = resources.files("ftte_hub").joinpath("profiles.json").read_text()
        where = "built-in profiles"
    else:
        where = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read profiles file {path}: {e.strerror}") from None
    shape = "expected {\"profiles\": {name: {flops_per_s, memory_budget, down_bps, up_bps, ...}}}"
    try:
        raw = json.loads(text)["profiles"]
        if not isinstance(raw, dict) or not all(isinstance(spec, dict) for spec in raw.values()):
            raise TypeError("profiles must be an object of objects")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: {shape}: {e}") from None
    for name, spec in raw.items():
        if "dropout" in spec:
            raise ValueError(f"{where}: profile {name!r}: 'dropout' (a chance per task) is now 'dropout_per_s', "
                             "a rate per second of work (a chance per task penalised short tasks)")
    try:
        profiles = {name: DeviceProfile(name=name, **spec) for name, spec in raw.items()}
    except TypeError as e:
        raise ValueError(f"{where}: {shape}: {e}") from None
    for p in profiles.values():
        if (p.memory_budget is None) == (p.memory_fraction is None):
            raise ValueError(f"{where}: profile {p.name!r} needs one of memory_budget (bytes) or memory_fraction")
        budget = p.memory_budget if p.memory_budget is not None else p.memory_fraction
        numbers = (p.flops_per_s, p.down_bps, p.up_bps, budget, p.latency_s, p.dropout_per_s, p.rejoin_s, p.weight)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise ValueError(f"{where}: profile {p.name!r}: speeds, budget, latency, dropout_per_s, rejoin_s and "
                             "weight must be finite numbers")
        if min(p.flops_per_s, p.down_bps, p.up_bps, budget) <= 0 or min(p.dropout_per_s, p.latency_s, p.rejoin_s,
                                                                         p.weight) < 0:
            raise ValueError(f"{where}: profile {p.name!r} needs positive speeds/budget and latency_s, "
                             "dropout_per_s, rejoin_s and weight >= 0")
    if not profiles:
        raise ValueError(f"{where}: no profiles")
    if not sum(p.weight for p in profiles.values()) > 0:
        raise ValueError(f"{where}: every profile has weight 0 (a weight is its share of the fleet)")
    return profiles


@dataclass
class SimDevice:
    id: str
    profile: DeviceProfile
    slowdown: float
    x: np.ndarray
    y: np.ndarray
    memory_budget: int = 0
    has_frozen: bool = False
    online: bool = True
    busy: bool = False
    tasks_done: int = 0
    updates_merged: int = 0

    @property
    def straggler(self) -> bool:
        return self.slowdown > 1.0


# ---------------------------------------------------------------------------------------------
# configuration and results
@dataclass
class SimConfig:
    clients: int = 100
    stragglers: float = 0.9
    straggler_slowdown: float = 10.0
    strategies: Sequence[str] = ("ftte", "ftte-tiered", "fedbuff", "fedbuff-full", "fedavg", "fedavg-full")
    dataset: str = "digits"
    alpha: float = 0.5
    samples_per_device: int = 64
    # a zoo name, a path to an .onnx file, or a Model (used as given)
    model: Union[str, "ft.Model"] = "mlp"
    # a zoo model's input shape per sample (None: REFERENCE_SHAPES, else the data's shape)
    input_shape: Optional[Sequence[int]] = None
    buffer: int = 10
    max_versions: int = 60
    # Virtual-time horizon (s) for every strategy. None: the synchronous baseline runs its
    # max_versions rounds first and its finishing time becomes everyone's horizon, so the
    # semi-asynchronous strategies get the same time, not the same number of merges
    # (up to async_version_cap merges; None: ASYNC_MERGES_PER_DEVICE per device, so a larger fleet,
    # which merges more often, still runs to the horizon).
    max_time: Optional[float] = None
    async_version_cap: Optional[int] = None
    local_epochs: float = 1.0
    batch_size: int = 16
    lr: float = 0.05
    server_lr: float = 1.0
    pretrain_fraction: float = 0.05
    memory_budget: Optional[int] = None
    profiles_path: Optional[str] = None
    seed: int = 0
    target_fraction: float = 0.95
    # kernel threads of the simulated devices (None: this process's); memory predictions and the
    # recorded peaks depend on it (kernel scratch is per thread)
    threads: Optional[int] = None
    # FTTE's knobs (docs/aggregation.md): staleness exponent a, variance strength b, and its own
    # server learning rate (None: server_lr, as the baselines). a = 0.5 came out of the sweep in
    # docs/benchmarks.md (the strategy's own default, the networked hub's, is 1). The server lr
    # was 2 from that sweep (two seeds, before the per-base step budget); with the budget, 1 (the
    # strategy's and the hub's) measured better on seeds 0-2 at both fleet sizes: at 100 devices
    # time to target 0.09 against 0.16 of FedAvg's, bytes 0.25 against 0.40, final 0.896 against
    # 0.902; at 500 final 0.935 against 0.851 (docs/simulator.md, "Server lr 1").
    age_exponent: float = 0.5
    variance_strength: float = 1.0
    ftte_server_lr: Optional[float] = 1.0
    # ftte-tiered's server learning rate (None: server_lr, 1 as the strategy's default). Not
    # ftte_server_lr: the sweep that once chose 2 for it ran plain ftte only, and the tiered merge weighs each
    # parameter over the updates that trained it, so a parameter only the largest tier trains
    # takes the whole (x2) step from the few of the K updates that came from those devices: its
    # accuracy swung by +-0.10 at lr 2 (seed 7, 100 devices) and +-0.01 at lr 1.
    tiered_server_lr: Optional[float] = None
    # ftte-tiered's staleness exponent. 0.5 with its server-step decay (tiered_lr_decay), 1 (the
    # strategy's own default) without one: with age (1 + tau)^-a, while one device's task is out
    # (tau ~ participating devices / K versions, 35 at 500 devices) the model takes
    # sum_tau (1 + tau)^-a ~ 2 sqrt(tau) mean deltas of stale updates at a = 0.5 (~12 at 500
    # devices: without a decay ftte-tiered's full-model tier overshot and swung between 0.35 and
    # 0.90), ~ln(tau) at a = 1. The decay shrinks those late steps instead, and keeps the early ones
    # whole (docs/simulator.md, "ftte-tiered's decay"; seeds 0-2, ftte-tiered - fedbuff-full: CNN
    # -6.78 -> -1.30 points, MLP +5.29 -> +5.94, 500 devices +7.99 -> +8.91).
    tiered_age_exponent: float = 0.5
    # plain FTTE's per-base step budget in mean deltas (docs/aggregation.md; None: the strategy's
    # own default, 1; 0 turns it off, the ablation; ftte-tiered has none). 0.5 here: half a mean
    # delta is inside the margin of every start line-searched (one is not, on the CNN's seed 1),
    # and at the then server lr 2 it reached 0.85 and 0.87 sooner than 1 on every MLP seed measured
    # (0, 1, 2 and 7) and ended higher on all three CNN seeds, with a final MLP accuracy 3 points
    # lower (docs/benchmarks.md, "FTTE's per-base step budget").
    base_step_budget: Optional[float] = 0.5
    # plain FTTE's server-step decay, in merges per device (None or 0: off): the step at version v
    # is scaled by 1 / sqrt(1 + v / (ftte_lr_decay x clients)) (FTTE.lr_decay). 3 measured on seeds
    # 0-2 (docs/aggregation.md, "Server-step decay"): the CNN's classifier-only ftte stops swinging
    # (ftte - fedbuff -5.01 -> +1.30 points), the MLP keeps its quick climb (bytes to target 0.18 ->
    # 0.24 of FedAvg's, time 0.06 -> 0.09), 500 devices alike.
    ftte_lr_decay: Optional[float] = 3.0
    # plain FTTE's agreement damping kappa (FTTE.agreement_damping; 0: off; ftte-tiered has none):
    # a buffer whose stale updates agree (rho, FTTE.agreement) takes a step scaled by
    # sum n_k (1 + tau_k)^(-kappa rho) / sum n_k. 0.25 measured on seeds 0-2 (docs/aggregation.md,
    # "Agreement damping"): the CNN's classifier-only ftte, whose buffers agree (mean rho 0.69-0.86
    # on seed 1), reaches the target in 0.25 virtual s instead of 0.81 (10.7 MiB instead of 26.6);
    # the MLP's, whose buffers mostly do not (0.45 in its first tenth, 0.06-0.27 after, seed 0),
    # keeps its pace (0.21 s against 0.24, final -0.7 points).
    agreement_damping: float = 0.25
    # ftte-tiered's server-step decay, in merges per device (None or 0: off), as ftte_lr_decay; a
    # quarter of a merge per device: 0.25, 0.5 and 1 measured -1.30, -1.76 and -2.51 points against
    # fedbuff-full on the CNN (seeds 0-2, staleness exponent 0.5), alike on the MLP
    tiered_lr_decay: Optional[float] = 0.25
    # evaluate on the validation set after every merge (False: only at the start and the end,
    # the curve then holds those two points; for timing the fleet alone)
    evaluate_every_merge: bool = True
    # the ftte strategies' downlink may send direct steps from each device's mirror (the fleet's
    # default; False = canonical frames only, the hub's --no-direct-steps)
    downlink_direct: bool = True
    downlink_bits: int = 8              # the ftte strategies' downlink steps: int8 or packed int4 (--downlink-bits)
    update_bits: int = 8                # the ftte strategies' uplink deltas: int8 or packed int4 (--update-bits)
    # the ftte strategies install the model with the weights a tier does not train as int8 when
    # they train with frozen weights int8 (the hub's default; False = float32, train --float32-install)
    int8_install: bool = True


@dataclass
class StrategyRun:
    name: str
    curve: List[tuple] = field(default_factory=list)  # (virtual seconds, version, accuracy, bytes down, bytes up)
    bytes_down: int = 0
    bytes_up: int = 0
    tasks: int = 0
    merges: int = 0
    staleness: List[int] = field(default_factory=list)
    peak_memory_predicted: int = 0
    peak_memory_recorded: int = 0
    trainable_params: int = 0
    subset: str = ""
    wall_seconds: float = 0.0
    rejected: int = 0
    per_task_down: List[int] = field(default_factory=list)
    per_task_up: List[int] = field(default_factory=list)
    min_memory_recorded: int = 0
    install_bytes: int = 0      # of bytes_down: the model's one-time install on the ftte devices
    install_frame_bytes: List[int] = field(default_factory=list)   # one device's install, per tier
    participating: int = 0
    sat_out: int = 0
    devices_trained: int = 0
    departures: int = 0         # tasks lost because their device left mid-task
    tiers: List[Dict[str, int]] = field(default_factory=list)
    downlink_frames: Dict[str, int] = field(default_factory=dict)   # ftte strategies: frames sent by kind
    start_accuracy: float = 0.0   # of the strategy's start (the ftte int8 install's: its quantised start)
    quantised_values: int = 0     # trained weights the start holds as their int8 round trip


# ---------------------------------------------------------------------------------------------
def build_sim_model(cfg: SimConfig, data_shape: Sequence[int], num_classes: int) -> Tuple["ft.Model", str]:
    """The start model (untrained) and a line saying what it is and where its shape comes from."""
    spec = cfg.model
    if isinstance(spec, ft.Model):
        if cfg.input_shape is not None:
            raise ValueError("input_shape applies to zoo models; a given model has its own")
        model = spec.copy()
        return model, f"model: {model.name} as given, input {list(model.input_shape)}"
    spec = str(spec)
    if spec in zoo_names():
        if cfg.input_shape is not None:
            shape, why = tuple(int(d) for d in cfg.input_shape), "--input-shape"
        elif spec in REFERENCE_SHAPES:
            shape, why = REFERENCE_SHAPES[spec], "its reference shape; --input-shape changes it"
        else:
            shape, why = tuple(data_shape), "the data's shape"
        extra = {"hidden": (256, 256)} if spec == "mlp" else {}
        try:
            model = ft.zoo(spec, shape, num_classes, seed=cfg.seed, **extra)
        except ValueError as e:
            raise ValueError(f"zoo model {spec!r} for input {list(shape)}: {str(e).splitlines()[0]}") from None
        return model, f"model: zoo {spec}, input {list(shape)} ({why})"
    if not spec.lower().endswith(".onnx") and not Path(spec).exists():
        raise ValueError(f"--model {spec!r} is neither a zoo model ({', '.join(zoo_names())}) nor an .onnx file")
    if cfg.input_shape is not None:
        raise ValueError(f"--input-shape applies to zoo models; {spec} fixes its own input shape")
    try:  # a missing file, no onnx package (32-bit ARM), an op it refuses: one line each
        model = load_model_file(spec)
    except ToolError as e:
        raise ValueError(str(e)) from None
    if model.num_classes < num_classes:
        raise ValueError(f"{spec} has {model.num_classes} outputs, but the data has {num_classes} classes")
    return model, f"model: {spec} ({model.name}), input {list(model.input_shape)}, {len(model.layers)} layers"


def start_description(model_spec: Union[str, "ft.Model"], pretrain_samples: int) -> str:
    """Where the start model's weights come from, for results.json's ``start``: a zoo model is
    randomly initialised (from scratch) unless pretrained; an ONNX file or a given Model starts
    from its own weights (which may themselves be trained), then any central pretraining."""
    if isinstance(model_spec, ft.Model):
        own = f"the weights of the given model {model_spec.name}"
    elif str(model_spec) in zoo_names():
        own = None
    else:
        own = f"the weights in {model_spec}"
    if pretrain_samples:
        return f"pretrained centrally on {pretrain_samples} samples" + (f" from {own}" if own else "")
    return f"from {own}" if own else "from scratch (random initialisation)"


def channels_last(model: "ft.Model") -> bool:
    """Whether the model takes channels-last samples ([H, W, C] or [L, C]): its input goes through
    a Transpose that moves the last axis first (tf2onnx's NHWC -> NCHW at a Keras model's input)."""
    n = len(model.input_shape)
    return any(isinstance(layer, Transpose) and ins == (0,) and layer.perm == (n - 1,) + tuple(range(n - 1))
               for layer, ins in zip(model.layers, model.inputs)) and n >= 2


class _Setup:
    """What every strategy shares: data, devices, the start model and the hub's subset."""

    def __init__(self, cfg: SimConfig, log: Callable[[str], None]):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        if cfg.dataset == "digits":
            ds = ftdata.load_bundled("digits")
        else:
            ds = ftdata.load_npz(cfg.dataset)
        self.dataset_name = ds.name if cfg.dataset == "digits" else str(cfg.dataset)
        self.model, what = build_sim_model(cfg, ds.feature_shape, ds.num_classes)
        self.model_label = self.model.name if isinstance(cfg.model, ft.Model) else str(cfg.model)
        log(what)
        train, val = ftdata.train_val_split(ds, val_fraction=0.2, seed=cfg.seed)
        # A small public split pretrains the start model, as on-device fine-tuning usually starts.
        n_pre = int(round(cfg.pretrain_fraction * len(train)))
        order = rng.permutation(len(train))
        pre, fleet = train.subset(order[:n_pre]), train.subset(order[n_pre:])

        # Devices: profiles drawn by weight; a fraction of stragglers; non-IID data.
        profiles = load_profiles(cfg.profiles_path)
        names = sorted(profiles)
        weights = np.array([profiles[n].weight for n in names], float)
        picks = rng.choice(len(names), size=cfg.clients, p=weights / weights.sum())
        n_slow = int(round(cfg.stragglers * cfg.clients))
        slow = set(rng.choice(cfg.clients, size=n_slow, replace=False).tolist()) if n_slow else set()
        self.augmented = cfg.clients * cfg.samples_per_device > len(fleet)
        if self.augmented:
            parts = _augmented_parts(fleet, cfg.clients, cfg.samples_per_device, cfg.alpha, cfg.seed)
        else:
            parts = ftdata.partition_dirichlet(fleet, cfg.clients, cfg.alpha, seed=cfg.seed, min_size=1)
        # Samples take the model's input shape last: partitioning and augmentation (pixel shifts)
        # work on the data as it is, and resampling is per sample and deterministic.
        shape, last = tuple(self.model.input_shape), channels_last(self.model)
        val, self.resampled = ftdata.resample_to_shape(val, shape, label=self.dataset_name, channels_last=last)
        if self.resampled:
            log(f"data: {self.resampled}")
        pre = ftdata.resample_to_shape(pre, shape, channels_last=last)[0]
        parts = [ftdata.resample_to_shape(part, shape, channels_last=last)[0] for part in parts]
        self.val = val
        if n_pre:
            ft.Trainer(self.model, lr=cfg.lr, momentum=0.9, seed=cfg.seed).train(pre.x, pre.y, epochs=5, batch_size=32)
        self.start_state = {k: v.copy() for k, v in self.model.state().items()}
        _, self.start_accuracy = self.model.evaluate(val.x, val.y)
        self.pretrained = n_pre > 0
        self.start = start_description(cfg.model, n_pre)
        log(f"data: {self.dataset_name}, {len(fleet)} samples across {cfg.clients} devices "
            f"(Dirichlet alpha {cfg.alpha}), {len(val)} for validation, {n_pre} to pretrain "
            f"(start accuracy {self.start_accuracy:.3f})")
        self.devices: List[SimDevice] = []
        for i, part in enumerate(parts):
            self.devices.append(SimDevice(f"dev{i:04d}", profiles[names[picks[i]]],
                                          cfg.straggler_slowdown if i in slow else 1.0, part.x, part.y))

        # Budgets: absolute, or a share of this model's full training step (the profiles' presets:
        # the smallest devices hold 20% of it, docs/simulator.md).
        self.full_step_bytes = predict_memory(self.model, batch_size=cfg.batch_size)["total"]
        for d in self.devices:
            d.memory_budget = d.profile.budget_bytes(self.full_step_bytes)
        # The FTTE subset: the smallest device budget, importance from the hub's validation data.
        # Only sparse strategies use it (the search takes minutes on a deep model such as
        # mobilenetv1, so runs of baselines alone skip it).
        self.m_min = cfg.memory_budget or min(d.memory_budget for d in self.devices)
        self.full_subset = Subset.full(self.model)
        self.ftte_subset = self.full_subset
        self.ftte_frozen = "float32"   # the search may hold the subset's frozen layers int8 (as the hub's does)
        self.ftte_micro_batch = 0      # and, where no one-pass step fits, train in micro-batches
        self.tiers: List[Tuple[Subset, int]] = [(self.full_subset, self.full_step_bytes)]
        sparse = [n for n in cfg.strategies if make_strategy(n, buffer_size=cfg.buffer).sparse]
        if sparse:
            self.scores = importance_scores(self.model, val.x, val.y, seed=cfg.seed)
            try:
                search = search_subset(self.model, self.scores, self.m_min, batch_size=cfg.batch_size, frozen="auto")
            except BudgetTooSmall as e:
                if cfg.memory_budget is not None:
                    raise
                # The smallest devices cannot train even the cheapest subset of this model: they
                # sit out (as they would on a real fleet), and M_min is the smallest budget that
                # can; if none can, a quarter of full training (at least twice the cheapest subset).
                able = sorted(d.memory_budget for d in self.devices if d.memory_budget >= e.minimum_bytes)
                self.m_min = able[0] if able else max(self.full_step_bytes // 4, 2 * e.minimum_bytes)
                log(f"the profiles' smallest budget ({e.budget_bytes / 1024:.0f} KiB) cannot train this model "
                    f"(its cheapest subset needs {e.minimum_bytes / 1024:.0f} KiB): "
                    + (f"those devices sit out; M_min is the next budget, {self.m_min / 1024:.0f} KiB" if able else
                       f"M_min is a quarter of full training, {self.m_min / 1024:.0f} KiB (--memory-budget sets it)"))
                search = search_subset(self.model, self.scores, self.m_min, batch_size=cfg.batch_size,
                                       frozen="auto")
            self.model.load_state(self.start_state)
            self.ftte_subset, self.ftte_frozen = search.subset, search.frozen
            self.ftte_micro_batch = search.micro_batch
            log(f"FTTE subset for M_min {self.m_min / 1024:.0f} KiB: {self.ftte_subset.describe(self.model)} "
                f"({self.ftte_subset.num_trainable(self.model):,}/{self.model.num_params():,} parameters, "
                f"predicted {search.predicted_bytes / 1024:.0f} KiB"
                f"{search.levers().replace(';', ',')}; full training step "
                f"{self.full_step_bytes / 1024:.0f} KiB)")
            if "ftte-tiered" in sparse:
                # searched and priced as trained: with the frozen layers int8 when the search for w*
                # chose that (the devices' tier choice and the strategy's tier bytes follow it); the
                # real hub builds its tiers with the same call (ftte_hub.train)
                self.tiers = nested_tiers(self.model, self.scores, self.ftte_subset,
                                          [d.memory_budget for d in self.devices],
                                          cfg.batch_size, self.full_step_bytes, frozen=self.ftte_frozen,
                                          micro_batch=self.ftte_micro_batch)
                for i, (sub, nbytes) in enumerate(self.tiers):
                    log(f"tier {i}: {sub.num_trainable(self.model):,} parameters, {nbytes / 1024:.0f} KiB: "
                        f"{sub.describe(self.model)}")


def _augmented_parts(fleet: "ftdata.Dataset", clients: int, per_device: int, alpha: float,
                     seed: int) -> List["ftdata.Dataset"]:
    """Device datasets for fleets larger than the data: label-skewed, augmented, per device.

    Each device draws its class mix from Dirichlet(alpha), picks that many originals of each class
    from the shared pool, and keeps shifted, noisy copies of them (``ftte_core.data.augment``),
    so every device holds its own ``per_device`` samples with its own label skew.
    """
    rng = np.random.default_rng(seed + 1)
    pools = [np.flatnonzero(fleet.y == c) for c in range(fleet.num_classes)]
    present = np.array([len(p) > 0 for p in pools], float)
    parts = []
    for i in range(clients):
        p = rng.dirichlet(np.full(fleet.num_classes, alpha)) * present
        p = p / p.sum() if p.sum() > 0 else present / present.sum()
        counts = rng.multinomial(per_device, p)
        idx = np.concatenate([rng.choice(pools[c], size=k) for c, k in enumerate(counts) if k])
        parts.append(ftdata.augment(fleet.subset(idx), per_device, seed=seed * 100003 + i))
    return parts


def downlink_bytes(task, cost: "_TierCost", device_id: str, has_frozen: bool) -> Tuple[int, int, Mapping]:
    """(bytes a task sends down to a device, of which the model's one-time install, the values the
    device trains from).

    The one place the simulator counts downlink bytes. The ftte strategies ship what the fleet's
    downlink deltas send (exact frame bytes of the frame the fleet would pick: snapshot, canonical
    chain or direct step, ``ftte_core.downlink``), and the device trains from the values a real
    agent would hold (canonical, or its mirror after a direct step); the baselines ship float32 values as the TASK
    frame carries them. On an ftte device's first task the model file goes down once, as the hub's
    MODEL frame carries it (``modelfile.install_bytes``: the weights its tier does not train int8
    when it trains them so; devices cache it, and the downlink's first frame builds on its values)."""
    install = 0 if has_frozen else cost.install_bytes
    if cost.downlink is None:
        return task.payload_bytes + install, install, task.values
    values_down, values = cost.downlink.task(device_id, task.base_version, task.values)
    return values_down + install, install, values


@dataclass
class _TierCost:
    """What training one tier costs a device (the full subset for the baselines)."""

    subset: Subset
    predicted_bytes: int
    flops_per_sample: int
    install_bytes: int        # the model's one-time install on a device (0: tasks carry the whole model)
    worker: LocalWorker
    downlink: Optional[DownlinkCounter] = None   # the ftte strategies' downlink stream for this tier


#: merges per device a semi-asynchronous strategy may make at most (``SimConfig.async_version_cap``
#: None): 2,000 for 100 devices, which reach the digits MLP's horizon (FedAvg's 60 rounds) at
#: about 2,000 merges; 500 devices merge five times as often in the same virtual time
ASYNC_MERGES_PER_DEVICE = 20


def async_cap(cfg: SimConfig) -> int:
    """Merges at most per semi-asynchronous strategy: ``cfg.async_version_cap``, else
    ``ASYNC_MERGES_PER_DEVICE`` per device."""
    return int(cfg.async_version_cap) if cfg.async_version_cap is not None else ASYNC_MERGES_PER_DEVICE * cfg.clients


def strategy_server_lr(cfg: SimConfig, name: str) -> float:
    """The server learning rate the simulator gives a strategy: ftte-tiered its own
    (``tiered_server_lr``), the other ftte strategies ``ftte_server_lr``, the baselines ``server_lr``."""
    if name == "ftte-tiered":
        return cfg.tiered_server_lr if cfg.tiered_server_lr is not None else cfg.server_lr
    if name.startswith("ftte") and cfg.ftte_server_lr is not None:
        return cfg.ftte_server_lr
    return cfg.server_lr


def strategy_age_exponent(cfg: SimConfig, name: str) -> Optional[float]:
    """The staleness exponent the simulator gives an ftte strategy: ftte-tiered its own
    (``tiered_age_exponent``), the others ``age_exponent``; None for the baselines (FedBuff's
    1/sqrt(1 + tau) is fixed, as published)."""
    if name == "ftte-tiered":
        return cfg.tiered_age_exponent
    return cfg.age_exponent if name.startswith("ftte") else None


def _run_strategy(setup: _Setup, name: str, progress: Callable[[str], None],
                  horizon: Optional[float] = None) -> StrategyRun:
    cfg = setup.cfg
    extra = {}
    if name.startswith("ftte"):
        extra = {"age_exponent": strategy_age_exponent(cfg, name), "variance_strength": cfg.variance_strength,
                 "bits": cfg.update_bits}
        if cfg.base_step_budget is not None and name != "ftte-tiered":
            extra["base_step_budget"] = cfg.base_step_budget
        decay = cfg.tiered_lr_decay if name == "ftte-tiered" else cfg.ftte_lr_decay
        if decay:
            extra["lr_decay_merges"] = decay * cfg.clients
        if cfg.agreement_damping and name != "ftte-tiered":
            extra["agreement_damping"] = cfg.agreement_damping
    if name == "ftte-tiered":
        extra.update(tiers=[t for t, _ in setup.tiers], tier_bytes=[b for _, b in setup.tiers])
    strategy = make_strategy(name, buffer_size=cfg.buffer, server_lr=strategy_server_lr(cfg, name), **extra)
    max_versions = cfg.max_versions if horizon is None or strategy.synchronous else async_cap(cfg)
    model = setup.model.copy()
    model.load_state(setup.start_state)
    subset = setup.ftte_subset if strategy.sparse else setup.full_subset
    frozen = setup.ftte_frozen if strategy.sparse else "float32"
    micro = setup.ftte_micro_batch if strategy.sparse else 0
    task_cfg = TaskConfig(lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, frozen=frozen,
                          micro_batch=micro)
    run = StrategyRun(name, start_accuracy=setup.start_accuracy)
    if strategy.sparse and frozen == "int8" and cfg.int8_install:
        # as the hub does (ftte_hub.train): the trained rows start at their int8 round trip, so the
        # install carries them int8, exactly (model file version 4)
        run.quantised_values = quantize_trained_rows(model, list(strategy.tiers) if strategy.tiers else [subset])
        run.start_accuracy = model.evaluate(setup.val.x, setup.val.y)[1]
    driver = RoundDriver(model, subset, strategy, task_cfg, max_versions=max_versions)
    costs = []
    for tier_subset in driver.tiers:
        predicted = predict_memory(model, tier_subset, cfg.batch_size, frozen=frozen, micro_batch=micro)["total"]
        install = 0
        if strategy.sparse:  # exactly the MODEL frame the hub would send this tier's (current) agents
            install = len(install_bytes(model, tier_subset, frozen if cfg.int8_install else "float32"))
        costs.append(_TierCost(tier_subset, predicted, training_flops(model, tier_subset, 1), install,
                               LocalWorker(model.copy(), tier_subset),
                               # the fleet's downlink deltas (ftte strategies; the baselines ship float32
                               # values as published)
                               DownlinkCounter(subset_values(model, tier_subset), bits=cfg.downlink_bits,
                                               direct=cfg.downlink_direct)
                               if strategy.sparse else None))
    cost_by_fp = {c.subset.fingerprint(): c for c in costs}
    run.subset, run.trainable_params = driver.subset.describe(model), driver.subset.num_trainable(model)
    run.peak_memory_predicted = costs[-1].predicted_bytes

    rng = np.random.default_rng(cfg.seed + 7)
    devices = [_fresh(d) for d in setup.devices]
    by_id = {d.id: d for d in devices}
    # Held to budgets: a device whose budget cannot hold what it would train sits out (tiered:
    # the smallest tier; the driver gives each device the largest tier it holds).
    if strategy.budget_held:
        eligible = [d for d in devices if d.memory_budget >= costs[0].predicted_bytes]
    else:
        eligible = list(devices)
    run.participating, run.sat_out = len(eligible), len(devices) - len(eligible)
    if strategy.tiers:
        tier_of = {d.id: strategy.tier_for_budget(d.memory_budget) for d in eligible}
        run.tiers = [{"trainable_params": c.subset.num_trainable(model), "predicted_bytes": c.predicted_bytes,
                      "devices": sum(1 for t in tier_of.values() if t == i), "install_bytes": c.install_bytes}
                     for i, c in enumerate(costs)]
    run.install_frame_bytes = [c.install_bytes for c in costs]
    trained_ids = set()
    events: list = []
    seq = 0

    def push(t, kind, dev, payload=None):
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, dev.id, payload))
        seq += 1

    def dispatch(t, dev):
        if not dev.online or dev.busy or driver.done:
            return
        task = driver.device_idle(dev.id)
        if task is None:
            return
        cost = cost_by_fp[task.subset_fingerprint]
        dev.busy = True
        down, install, values = downlink_bytes(task, cost, dev.id, dev.has_frozen)
        dev.has_frozen = True
        run.bytes_down += down
        run.install_bytes += install
        run.per_task_down.append(down)
        steps = max(1, int(round(cfg.local_epochs * len(dev.y) / min(cfg.batch_size, len(dev.y)))))
        samples = steps * min(cfg.batch_size, len(dev.y))
        compute = cost.flops_per_sample * samples / dev.profile.flops_per_s * dev.slowdown
        t_down = down / dev.profile.down_bps + dev.profile.latency_s
        leaves_at = t + leave_after(dev.profile.dropout_per_s, rng)
        if leaves_at < t + t_down + compute:  # leaves mid-task: the work is lost
            push(leaves_at, "gone", dev)
            return
        push(t + t_down + compute, "trained", dev, (task, cost, values, leaves_at))

    def evaluate() -> float:
        return model.evaluate(setup.val.x, setup.val.y)[1]

    def merged(now, report):
        nonlocal last_report
        run.merges += 1
        run.staleness.extend(report.staleness)
        if cfg.evaluate_every_merge or driver.done:
            run.curve.append((now, driver.version, evaluate(), run.bytes_down, run.bytes_up, run.install_bytes))
        if time.perf_counter() - last_report > 0.5 or driver.done:
            last_report = time.perf_counter()
            progress(f"  {name:<12} version {driver.version:>4}/{max_versions}  t={now:9.1f}s  "
                     f"accuracy {run.curve[-1][2]:.3f}  tasks {run.tasks}")
        # A merge may open a new round (FedAvg) or new work: idle devices ask in random order,
        # so a synchronous cohort is a random sample of the idle fleet, not its first K.
        for j in rng.permutation(len(eligible)):
            dispatch(now, eligible[j])

    last_report = time.perf_counter()
    for d in eligible:
        driver.device_joined(d.id, {"memory_budget": d.memory_budget})
    run.curve.append((0.0, driver.version, run.start_accuracy, 0, 0, 0))
    for j in rng.permutation(len(eligible)):
        dispatch(0.0, eligible[j])
    wall0 = time.perf_counter()
    now = 0.0
    while events and not driver.done:
        if horizon is not None and events[0][0] > horizon:
            break
        now, _, kind, dev_id, payload = heapq.heappop(events)
        dev = by_id[dev_id]
        if kind == "trained":
            task, cost, values, leaves_at = payload
            res = cost.worker.run(values, task.base_version, dev.x, dev.y, task.config, bits=task.bits,
                                  seed=task.seed, device_id=dev.id)
            res.update.task_id = task.id
            total = res.memory.total
            run.peak_memory_recorded = max(run.peak_memory_recorded, total)
            run.min_memory_recorded = min(run.min_memory_recorded or total, total)
            up = res.update.nbytes
            run.tasks += 1
            run.bytes_up += up
            run.per_task_up.append(up)
            trained_ids.add(dev.id)
            arrives = now + up / dev.profile.up_bps + dev.profile.latency_s
            if leaves_at < arrives:  # leaves while uploading: the update is lost
                push(leaves_at, "gone", dev)
                continue
            push(arrives, "arrived", dev, (task, res.update))
        elif kind == "arrived":
            task, update = payload
            dev.busy = False
            dev.tasks_done += 1
            arrival = driver.update_arrived(dev.id, update, nbytes=update.nbytes)
            if not arrival.accepted:
                run.rejected += 1
            if arrival.merge is not None:
                merged(now, arrival.merge)
            else:
                dispatch(now, dev)
        elif kind == "gone":
            run.departures += 1
            dev.busy = False
            dev.online = False
            report = driver.device_gone(dev.id)  # a shrunken FedAvg cohort may complete its round
            push(now + dev.profile.rejoin_s, "rejoin", dev)
            if report is not None:
                merged(now, report)
        elif kind == "rejoin":
            dev.online = True
            driver.device_joined(dev.id)
            dispatch(now, dev)
    if run.curve[-1][1] != driver.version:  # evaluate_every_merge=False: the end point
        run.curve.append((now, driver.version, evaluate(), run.bytes_down, run.bytes_up, run.install_bytes))
    run.devices_trained = len(trained_ids)
    for c in costs:
        for kind, count in (c.downlink.kinds.items() if c.downlink is not None else ()):
            run.downlink_frames[kind] = run.downlink_frames.get(kind, 0) + count
    run.wall_seconds = time.perf_counter() - wall0
    return run


def leave_after(rate_per_s: float, rng: np.random.Generator) -> float:
    """Seconds until a working device leaves: exponential with the profile's rate (a device is as
    likely to leave in any second of work, whatever task it runs); inf when the rate is 0."""
    return float(rng.exponential(1.0 / rate_per_s)) if rate_per_s > 0 else float("inf")


def _fresh(d: SimDevice) -> SimDevice:
    return SimDevice(d.id, d.profile, d.slowdown, d.x, d.y, memory_budget=d.memory_budget)


# ---------------------------------------------------------------------------------------------
def simulate(cfg: SimConfig, log: Callable[[str], None] = print) -> Dict[str, object]:
    """Run every strategy on the same devices and data; return the results dictionary."""
    threads_before = K.get_num_threads()
    if cfg.threads is not None:
        K.set_num_threads(int(cfg.threads))
    try:
        return _simulate(cfg, log)
    finally:
        K.set_num_threads(threads_before)


def _simulate(cfg: SimConfig, log: Callable[[str], None]) -> Dict[str, object]:
    setup = _Setup(cfg, log)
    runs = {}
    horizon = cfg.max_time
    order = list(cfg.strategies)
    # The synchronous baseline sets the time budget: fedavg (held to budgets) when some device
    # can run it, else fedavg-full.
    for setter in ("fedavg", "fedavg-full"):
        if horizon is not None or setter not in order:
            continue
        order.remove(setter)
        log(f"running {setter} (its finishing time is every strategy's time budget) ...")
        runs[setter] = _run_strategy(setup, setter, log)
        if runs[setter].merges:
            horizon = runs[setter].curve[-1][0]
        else:
            log(f"{setter}: no device can run it ({runs[setter].sat_out} sat out); it sets no time budget")
    for name in order:
        log(f"running {name} ...")
        runs[name] = _run_strategy(setup, name, log, horizon)
    runs = {name: runs[name] for name in cfg.strategies}
    return _summarise(cfg, setup, runs, horizon)


def _summarise(cfg: SimConfig, setup: _Setup, runs: Dict[str, StrategyRun],
               horizon: Optional[float]) -> Dict[str, object]:
    finals = {n: r.curve[-1][2] for n, r in runs.items()}
    target = cfg.target_fraction * max(finals.values())
    out = {
        "clients": cfg.clients, "stragglers": cfg.stragglers, "straggler_slowdown": cfg.straggler_slowdown,
        "seed": cfg.seed, "dataset": setup.dataset_name, "alpha": cfg.alpha, "model": setup.model_label,
        "input_shape": list(setup.model.input_shape), "data_resampled": setup.resampled,
        "buffer": cfg.buffer, "max_versions": cfg.max_versions, "time_budget_s": horizon,
        "pretrained": setup.pretrained, "start": setup.start,
        "augmented_device_data": setup.augmented, "samples_per_device": cfg.samples_per_device,
        "memory_budget_min": setup.m_min, "ftte_frozen": setup.ftte_frozen,
        "ftte_micro_batch": setup.ftte_micro_batch, "start_accuracy": setup.start_accuracy,
        "ftte_update_bits": cfg.update_bits, "ftte_downlink_bits": cfg.downlink_bits,
        "ftte_direct_steps": cfg.downlink_direct,
        "ftte_int8_install": cfg.int8_install,
        # plain ftte's per-base step budget (None: off; ftte-tiered has none)
        "ftte_base_step_budget": (FTTE.BASE_STEP_BUDGET if cfg.base_step_budget is None
                                  else (float(cfg.base_step_budget) or None)),
        # plain ftte's server-step decay, in merges (None: off)
        "ftte_lr_decay_merges": cfg.ftte_lr_decay * cfg.clients if cfg.ftte_lr_decay else None,
        "tiered_lr_decay_merges": cfg.tiered_lr_decay * cfg.clients if cfg.tiered_lr_decay else None,
        # plain ftte's agreement damping kappa (0: off)
        "ftte_agreement_damping": float(cfg.agreement_damping or 0.0),
        "full_step_memory_bytes": setup.full_step_bytes,
        "device_budgets": {p: sorted({d.memory_budget for d in setup.devices if d.profile.name == p})[0]
                           for p in sorted({d.profile.name for d in setup.devices})},
        "target_accuracy": target,
        "target_definition": f"{cfg.target_fraction:.0%} of the best final accuracy any strategy reached",
        "strategies": {},
    }
    for name, r in runs.items():
        # curve: [virtual s, validation accuracy, bytes down so far, bytes up so far], from the start,
        # one point per merge (FedAvg: per round); curve_versions: the model version of each point
        curve = [[round(t, 3), round(a, 4), int(down), int(up)] for t, _v, a, down, up, _i in r.curve]
        hit = next((i for i, p in enumerate(curve) if p[1] >= round(target, 4)), None)
        out["strategies"][name] = {
            "time_to_target_s": curve[hit][0] if hit is not None else None,
            "bytes_to_target": curve[hit][2] + curve[hit][3] if hit is not None else None,
            # the same without the model's one-time install on ftte devices (what the rounds themselves moved)
            "round_bytes_to_target": curve[hit][2] + curve[hit][3] - r.curve[hit][5] if hit is not None else None,
            "install_bytes_total": r.install_bytes,
            # the model file one device gets (its tier's; ftte strategies; 0: tasks carry the model)
            "install_bytes_per_device": r.install_frame_bytes[0] if len(r.install_frame_bytes) == 1
            else r.install_frame_bytes,
            "start_accuracy": r.start_accuracy,
            "quantised_start_values": r.quantised_values,
            "final_accuracy": r.curve[-1][2],
            "best_accuracy": max(p[2] for p in r.curve),
            "final_time_s": r.curve[-1][0],
            "participating_devices": r.participating,
            "devices_sat_out": r.sat_out,
            "devices_trained": r.devices_trained,
            "departures": r.departures,
            "downlink_frames": dict(r.downlink_frames),
            "min_device_memory_bytes": r.min_memory_recorded,
            "peak_device_memory_bytes": r.peak_memory_recorded,
            "peak_device_memory_predicted_bytes": r.peak_memory_predicted,
            "bytes_down_total": r.bytes_down,
            "bytes_up_total": r.bytes_up,
            "bytes_down_per_task": float(np.mean(r.per_task_down)) if r.per_task_down else 0.0,
            "bytes_up_per_task": float(np.mean(r.per_task_up)) if r.per_task_up else 0.0,
            "tasks": r.tasks,
            "merges": r.merges,
            "mean_staleness": float(np.mean(r.staleness)) if r.staleness else 0.0,
            "rejected_updates": r.rejected,
            "trainable_params": r.trainable_params,
            "subset": r.subset,
            "wall_seconds": r.wall_seconds,
            "curve": curve,
            "curve_versions": [int(p[1]) for p in r.curve],
        }
        if r.tiers:
            out["strategies"][name]["tiers"] = r.tiers
    return out
