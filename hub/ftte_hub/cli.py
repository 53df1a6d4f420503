"""`ftte-hub`: the coordinator's command line (keygen, train, demo, simulate, resample, split, predict,
evaluate, agents)."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import time

import click

from ftte_core.search import parse_size
from ftte_core.zoo import zoo_names


def _fail(msg: str) -> None:
    click.echo(f"ftte-hub: error: {msg}", err=True)
    sys.exit(2)


def _finite(ctx, param, value):
    """Refuse inf and nan at parse time (click's FloatRange lets both through a lower bound)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number, got {value!r}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ftte-fleet")
def main() -> None:
    """FTTE fleet hub: coordinates federated training on small devices."""


@main.command()
@click.option("--clients", type=click.IntRange(2, 100000), default=100, help="Number of simulated devices.")
@click.option("--stragglers", type=click.FloatRange(0.0, 1.0), default=0.9,
              help="Fraction of devices that are slow stragglers.")
@click.option("--straggler-slowdown", type=click.FloatRange(1.0), default=10.0,
              help="How many times slower a straggler computes.")
@click.option("--strategies", default="ftte,ftte-tiered,fedbuff,fedbuff-full,fedavg,fedavg-full",
              help="Comma list from ftte, ftte-tiered, ftte-noage, ftte-novar, fedbuff, fedbuff-full, fedavg, "
                   "fedavg-full (fedavg/fedbuff: devices whose budget cannot hold the full step sit out; "
                   "-full: every device trains the full model, an idealised bound).")
@click.option("--dataset", default="digits", help="'digits' (bundled) or a .npz file with x and y.")
@click.option("--alpha", type=click.FloatRange(min=0.0, min_open=True), default=0.5,
              help="Dirichlet label-skew concentration (smaller = more skewed).")
@click.option("--model", default="mlp", show_default=True,
              help=f"Zoo model ({', '.join(zoo_names())}) or an .onnx file; the data is resampled to its input "
                   "shape when it differs (docs/simulator.md).")
@click.option("--input-shape", default=None, metavar="CxHxW",
              help="A zoo model's input shape per sample, e.g. 3x32x32, 1x49x10, 3x128 or 640; default: the "
                   "MLPerf Tiny reference shape of resnet8/dscnn/mobilenetv1/autoencoder/sensor1d, the data's "
                   "shape for mlp/cnn.")
@click.option("--buffer", "buffer_k", type=click.IntRange(1), default=10,
              help="K: updates per merge (FedAvg: cohort size).")
@click.option("--max-versions", type=click.IntRange(1), default=60,
              help="FedAvg rounds; its finishing time becomes every strategy's time budget (see --max-time).")
@click.option("--max-time", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Virtual seconds every strategy runs for; default: the time FedAvg takes for --max-versions "
                   "rounds (without fedavg: --max-versions merges each).")
@click.option("--samples-per-device", type=click.IntRange(1), default=64,
              help="Minimum samples per device; smaller partitions are topped up with augmented copies.")
@click.option("--local-epochs", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              help="Local passes over a device's data per task.")
@click.option("--batch-size", type=click.IntRange(1), default=16, help="Local mini-batch size (samples).")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=0.05, help="Local SGD learning rate.")
@click.option("--server-lr", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              help="Server learning rate applied to each merge.")
@click.option("--pretrain-fraction", type=click.FloatRange(0.0, 0.9), default=0.05,
              help="Share of the training data used to pretrain the start model centrally (0 = from scratch).")
@click.option("--memory-budget", default=None,
              help="Override M_min, the smallest device budget (e.g. 256KiB); default: from the profiles.")
@click.option("--profiles", "profiles_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON file of device profiles; default: the shipped Pi Zero 2 W / Pi 4 / Pi 5 / Jetson presets.")
@click.option("--seed", type=int, default=0, help="Seed for data, devices, training.")
@click.option("--no-direct-steps", "no_direct", is_flag=True,
              help="The ftte strategies' downlink sends canonical frames only (no direct steps from each device's "
                   "mirror), as train --no-direct-steps.")
@click.option("--float32-install", "float32_install", is_flag=True,
              help="The ftte strategies install the model on devices as float32 even when they train with frozen "
                   "weights int8, as train --float32-install.")
@click.option("--downlink-bits", type=click.Choice(["8", "4"]), default="8",
              help="The ftte strategies' downlink steps: int8, or packed int4, as train --downlink-bits.")
@click.option("--update-bits", type=click.Choice(["8", "4"]), default="8",
              help="The ftte strategies' uplink deltas: int8, or packed int4, as train --update-bits.")
@click.option("--base-step-budget", type=click.FloatRange(min=0.0), default=0.5, show_default=True,
              metavar="MEAN_DELTAS",
              callback=_finite,
              help="Plain ftte's per-base step budget, as train --base-step-budget (0: off); 0.5 measured best "
                   "in the simulator (docs/benchmarks.md); train's default is off.")
@click.option("--lr-decay", type=click.FloatRange(min=0.0), default=None, metavar="MERGES_PER_DEVICE",
              callback=_finite,
              help="Plain ftte's server-step decay: the step at merge v is scaled by 1/sqrt(1 + v / (this x "
                   "clients)); 0: off. Default: the simulator's (docs/simulator.md).")
@click.option("--agreement-damping", type=click.FloatRange(min=0.0), default=None, metavar="KAPPA",
              callback=_finite,
              help="Plain ftte's agreement damping: a buffer whose stale updates agree (rho in [0, 1]) takes a step "
                   "scaled by sum n (1 + tau)^(-KAPPA rho) / sum n; 0: off. Default: the simulator's "
                   "(docs/aggregation.md).")
@click.option("--tiered-lr-decay", type=click.FloatRange(min=0.0), default=None, metavar="MERGES_PER_DEVICE",
              callback=_finite,
              help="ftte-tiered's server-step decay, as --lr-decay; 0: off. Default: the simulator's "
                   "(docs/simulator.md).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="ftte-sim", help="Output folder.")
def simulate(clients, stragglers, straggler_slowdown, strategies, dataset, alpha, model, input_shape, buffer_k,
             max_versions,
             max_time, samples_per_device, local_epochs, batch_size, lr, server_lr, pretrain_fraction, memory_budget,
             profiles_path, seed, no_direct, float32_install, downlink_bits, update_bits, base_step_budget, lr_decay,
             agreement_damping, tiered_lr_decay, out_dir):
    """Run the fleet on a virtual clock and compare strategies.

    Training is real (the engine, real data, real encoded updates); only time is simulated.
    Writes OUT/results.md, OUT/results.json and OUT/curves.svg.
    """
    from .report import write_results
    from .simulate import SimConfig, simulate as run

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    from ftte_core.strategies import STRATEGIES
    known = set(STRATEGIES)
    bad = [n for n in names if n not in known]
    if bad or not names:
        _fail(f"unknown strategy {', '.join(bad) or '(none given)'}; choose from {', '.join(sorted(known))}")
    try:
        budget = parse_size(memory_budget) if memory_budget else None
        shape = parse_shape(input_shape) if input_shape else None
        cfg = SimConfig(clients=clients, stragglers=stragglers, straggler_slowdown=straggler_slowdown,
                        strategies=names, dataset=dataset, alpha=alpha, model=model, input_shape=shape,
                        buffer=buffer_k,
                        max_versions=max_versions, max_time=max_time, samples_per_device=samples_per_device,
                        local_epochs=local_epochs, batch_size=batch_size, lr=lr, server_lr=server_lr,
                        pretrain_fraction=pretrain_fraction, memory_budget=budget,
                        profiles_path=profiles_path, seed=seed, downlink_direct=not no_direct,
                        downlink_bits=int(downlink_bits), update_bits=int(update_bits),
                        int8_install=not float32_install, base_step_budget=base_step_budget,
                        **({} if lr_decay is None else {"ftte_lr_decay": lr_decay or None}),
                        **({} if tiered_lr_decay is None else {"tiered_lr_decay": tiered_lr_decay or None}),
                        **({} if agreement_damping is None else {"agreement_damping": agreement_damping}))
        t0 = time.perf_counter()
        results = run(cfg, log=lambda m: click.echo(m, err=True))
        paths = write_results(results, out_dir)
    except ValueError as e:  # bad data, profiles, budgets: one line, no traceback
        _fail(str(e))
    click.echo(open(paths["md"]).read())
    click.echo(f"wrote {', '.join(paths.values())} in {time.perf_counter() - t0:.1f} s", err=True)


def parse_shape(text: str, option: str = "--input-shape"):
    """'3x32x32', '3,32,32' or '640' -> (3, 32, 32); ValueError with a one-line reason."""
    parts = [p for p in text.replace(",", "x").replace("X", "x").split("x")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected sizes joined by 'x', e.g. 3x32x32") from None
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(f"{option} {text!r}: 1 to 3 positive sizes, e.g. 3x32x32, 3x128 or 640")
    return shape


@main.command()
@click.argument("source")
@click.option("--shape", required=True, metavar="CxHxW",
              help="The model's input shape per sample, e.g. 3x32x32 (resnet8), 1x49x10 (dscnn), 3x128 or 640.")
@click.option("--channels-last", is_flag=True,
              help="--shape is [H, W, C] or [L, C] (a Keras model converted by tf2onnx takes NHWC input).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
def resample(source, shape, channels_last, out_path):
    """Resample SOURCE (an .npz data file, or 'digits') to a model's input shape.

    Images are resized bilinearly (a single channel repeated over the model's channels); for a
    1-D model [C, L] each sample is flattened and resampled to L; for [F] to F values. The same
    as `ftte-hub simulate` does (docs/simulator.md); use it for the validation file and each
    agent's --data before `ftte-hub train` with a model of another input shape.
    """
    from ftte_core import data as ftdata

    try:
        target = parse_shape(shape, "--shape")
        ds = ftdata.load_bundled("digits") if source == "digits" else ftdata.load_npz(source)
        out, how = ftdata.resample_to_shape(ds, target, label=source, channels_last=channels_last)
        ftdata.save_npz(out_path, out)
    except ValueError as e:  # DataError too
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot write {out_path}: {e.strerror or e}")
    click.echo(f"{how or f'{source}: samples already have shape {list(target)}'}; wrote {out_path} "
               f"({len(out)} samples)", err=True)


@main.command()
@click.argument("source", metavar="DATA")
@click.option("--devices", type=int, required=True, metavar="N", help="Number of device shards to write (1..samples).")
@click.option("--alpha", type=float, default=None, metavar="A",
              help="Dirichlet label-skew concentration (smaller = more skewed, e.g. 0.1 .. 100); default: IID "
                   "(shuffled, equal sizes).")
@click.option("--val", "val_fraction", type=float, default=0.2,
              help="Fraction of the samples kept for the hub's val.npz (stratified by class), in [0, 1); 0 writes "
                   "no val.npz.")
@click.option("--seed", type=int, default=0, help="Seed of the shuffles and draws (same seed, same split).")
@click.option("--out", "out_dir", required=True, type=click.Path(), metavar="DIR",
              help="Folder for device-K.npz and val.npz (created if missing).")
@click.option("--force", is_flag=True,
              help="Write into a non-empty --out (replacing its device-*.npz and val.npz, removing extra ones).")
@click.option("--compress", is_flag=True, help="Write compressed .npz files (smaller, slower to load).")
def split(source, devices, alpha, val_fraction, seed, out_dir, force, compress):
    """Split DATA (an .npz with x and y, or 'digits') into one file per device plus the hub's validation file.

    Writes OUT/device-0.npz .. OUT/device-{N-1}.npz (each device's --data) and OUT/val.npz (the hub's
    --val-data); every sample lands in exactly one file, and each file keeps the number of classes
    of DATA. Prints what each file holds. Preparing an .npz from CSV or images: docs/data.md.
    """
    from .tools import ToolError, split as run_split, split_table

    try:
        result = run_split(source, out_dir, devices, alpha=alpha, val_fraction=val_fraction, seed=seed,
                           force=force, compress=compress)
    except ToolError as e:
        _fail(str(e))
    how = "IID" if alpha is None else f"Dirichlet label skew, alpha {alpha:g}"
    click.echo(split_table(result))
    click.echo(f"wrote {len(result.shards)} files to {result.out} ({devices} devices, {how}, seed {seed})", err=True)


@main.command()
@click.option("--model", "model_spec", required=True, metavar="FILE|DIR",
              help="An .onnx model, or the --out folder of `ftte-hub train` / `ftte-hub demo` (its model.onnx).")
@click.option("--data", "data_spec", required=True, metavar="FILE",
              help="An .npz with x (y optional: then the accuracy is printed too), or 'digits'.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write predictions here (.npz: 'class' int32 [N], 'logits' float32 [N, classes]); default: "
                   "print the first --show.")
@click.option("--show", type=click.IntRange(0), default=10, help="Predictions to print when there is no --out.")
@click.option("--batch-size", type=click.IntRange(1), default=256, help="Samples per forward pass (memory bound).")
def predict(model_spec, data_spec, out_path, show, batch_size):
    """Classify the samples of --data with a trained model (our engine; no onnxruntime needed)."""
    from .tools import ToolError, prediction_lines, predict as run_predict, save_predictions

    try:
        p = run_predict(model_spec, data_spec, batch_size=batch_size)
        if out_path:
            save_predictions(out_path, p)
    except ToolError as e:
        _fail(str(e))
    except MemoryError:
        _fail("out of memory (a smaller --batch-size or a smaller data file helps)")
    for line in prediction_lines(p, 0 if out_path else show):
        click.echo(line)
    if out_path:
        click.echo(f"wrote {out_path} ('class' and 'logits' of {len(p.classes)} samples)", err=True)


@main.command()
@click.option("--model", "model_spec", required=True, metavar="FILE|DIR",
              help="An .onnx model, or the --out folder of `ftte-hub train` / `ftte-hub demo` (its model.onnx).")
@click.option("--data", "data_spec", required=True, metavar="FILE", help="Labelled .npz (x, y), e.g. the hub's val.npz, or 'digits'.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: accuracy, loss, balanced_accuracy, samples, num_classes, recall, "
                   "precision, support (per class) and confusion (rows: true class, columns: predicted).")
@click.option("--batch-size", type=click.IntRange(1), default=256, help="Samples per forward pass (memory bound).")
def evaluate(model_spec, data_spec, as_json, batch_size):
    """Accuracy, per-class recall and the confusion matrix of a model on labelled data."""
    from .tools import ToolError, evaluate as run_evaluate, evaluation_lines

    try:
        result = run_evaluate(model_spec, data_spec, batch_size=batch_size)
    except ToolError as e:
        _fail(str(e))
    except MemoryError:
        _fail("out of memory (a smaller --batch-size or a smaller data file helps)")
    if as_json:
        click.echo(json.dumps(result))
    else:
        for line in evaluation_lines(result):
            click.echo(line)


@main.command()
@click.option("--key", "key_path", default=None, type=click.Path(dir_okay=False),
              help="Fleet key file: ask each agent over the authenticated channel (a read-only query that never "
                   "disturbs a training run). Without it: what the agents' mDNS records say.")
@click.option("--interface", "interfaces", multiple=True, metavar="IP",
              help="IPv4 address of an interface mDNS uses (repeatable); default: all IPv4 interfaces.")
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="Also ask this address (repeatable; port default 7850), for networks where multicast is blocked.")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=600.0), default=3.0, metavar="S",
              help="Seconds to listen for mDNS answers, and the most one agent's answer may take.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of objects (name, agent_id, address, memory_budget in bytes, speed in GFLOP/s, "
                   "input_shape, num_classes, samples, models, pending, hub, training, error, ...).")
def agents(key_path, interfaces, peers, timeout, as_json):
    """List the agents reachable now (mDNS and --peer), one row each.

    Columns: name, id, address, architecture, memory budget, measured speed, data shape, classes,
    samples, cached models, pending updates, the hub connected to it (and tasks training). Exit
    status 1 when no agent is found or none answered.
    """
    from ftte_core.protocol import KeyFileError, read_key

    from .agents import format_table, run_survey
    from .discovery import parse_peer

    key = None
    if key_path is not None:
        try:
            key = read_key(key_path)
        except KeyFileError as e:
            _fail(str(e))
    import ipaddress
    for ip in interfaces:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            _fail(f"--interface {ip!r} is not an IPv4 address")
    addrs = []
    for p in peers:
        try:
            addrs.append(parse_peer(p))
        except ValueError as e:
            _fail(f"--peer: {e}")
    try:
        rows, notes = run_survey(key, addrs, list(interfaces) or None, timeout)
    except KeyboardInterrupt:
        _fail("interrupted")
    for note in notes:
        click.echo(f"ftte-hub: {note}", err=True)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    elif rows:
        click.echo(format_table(rows))
    answered = [r for r in rows if r["error"] is None]
    if not answered:
        where = "mDNS" + (f" and {len(addrs)} peer(s)" if addrs else "")
        click.echo(f"ftte-hub: {'no agent answered' if rows else 'no agents found'} ({where}, {timeout:g} s)",
                   err=True)
        sys.exit(1)


def _require_onnx(what: str) -> None:
    from .tools import ToolError, require_onnx
    try:
        require_onnx(what)
    except ToolError as e:
        _fail(str(e))


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key file (every device then needs the new key).")
def keygen(path, force):
    """Write a new fleet key to PATH (mode 0600); copy it to every device."""
    from ftte_core.protocol import generate_key, write_key

    if os.path.lexists(path) and not force:
        _fail(f"{path} already exists; refusing to overwrite a fleet key (use --force to replace it)")
    if os.path.isdir(path):
        _fail(f"{path} is a directory")
    try:
        write_key(path, generate_key())
    except OSError as e:
        _fail(f"cannot write {path}: {e.strerror or e}")
    click.echo(f"wrote a new fleet key to {path} (mode 0600); copy it to each device's --key path", err=True)


@main.command()
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
              help="Fleet key file (from `ftte-hub keygen`).")
@click.option("--model", "model_spec", default=None,
              help=f"Zoo model name ({', '.join(zoo_names())}; shaped by the validation data) or an .onnx file "
                   "(required, except with --site: the federation sends the model).")
@click.option("--val-data", required=True, type=click.Path(dir_okay=False),
              help="Validation .npz (x, y) the hub evaluates on and scores the subset search with.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: checkpoint, metrics.jsonl, model.onnx, summary.json. Reused = resumed.")
@click.option("--min-agents", type=click.IntRange(1), default=1, help="Agents to wait for before the subset search.")
@click.option("--peer", "peers", multiple=True, metavar="HOST:PORT",
              help="Static agent address (repeatable), for networks where mDNS is blocked.")
@click.option("--buffer", "buffer_k", type=click.IntRange(1), default=10, help="K: updates per merge.")
@click.option("--max-versions", type=click.IntRange(1), default=100, help="Stop after this many merged versions.")
@click.option("--target-accuracy", type=click.FloatRange(0.0, 1.0), default=None,
              help="Stop once validation accuracy reaches this (0..1).")
@click.option("--interface", "interfaces", multiple=True, metavar="IP",
              help="IPv4 address of an interface mDNS uses (repeatable); default: all IPv4 interfaces.")
@click.option("--no-mdns", is_flag=True, help="Do not browse mDNS; use --peer addresses only.")
@click.option("--strategy", type=click.Choice(["ftte", "ftte-tiered", "ftte-noage", "ftte-novar", "fedbuff", "fedavg"]),
              default="ftte", help="Aggregation strategy: ftte trains one subset sized for the smallest budget; "
              "ftte-tiered trains nested subsets, one per budget tier of the agents present at the start (at most "
              "4), each agent the largest its budget holds; fedbuff and fedavg train the full model.")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=0.05, help="Device SGD learning rate.")
@click.option("--local-epochs", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              help="Passes over a device's data per task.")
@click.option("--batch-size", type=click.IntRange(1), default=32,
              help="Device mini-batch (samples); the memory cost model uses the same.")
@click.option("--server-lr", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              help="Server learning rate of each merge.")
@click.option("--update-bits", type=click.Choice(["8", "4"]), default=None,
              help="How devices encode their deltas (ftte strategies): int8, or packed int4 (half the upload). "
                   "Default: 8. A resume keeps the run's.")
@click.option("--downlink-bits", type=click.Choice(["8", "4"]), default="8",
              help="The downlink stream's steps: int8, or packed int4 (half the bytes, coarser steps that the "
                   "error feedback catches up on).")
@click.option("--no-downlink-deltas", "no_downlink", is_flag=True,
              help="Send every task the trained values as float32 instead of int8 deltas of what the agent holds.")
@click.option("--base-step-budget", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              metavar="MEAN_DELTAS",
              callback=_finite,
              help="ftte: the updates computed from one model version move the model by at most this many mean "
                   "deltas in all (docs/aggregation.md); 0: off (on 3 agents, 1 reached 0.90 later in 5 of 6 "
                   "runs, docs/hub.md). A resume keeps the run's.")
@click.option("--agreement-damping", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              metavar="KAPPA", callback=_finite,
              help="ftte: a buffer whose stale updates agree (rho in [0, 1]) takes a step scaled by "
                   "sum n (1 + tau)^(-KAPPA rho) / sum n (docs/aggregation.md); 0: off. A resume keeps the run's.")
@click.option("--lr-decay", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              metavar="MERGES_PER_AGENT",
              callback=_finite,
              help="ftte strategies: the server step at merge v is scaled by 1/sqrt(1 + v / (this x the agents the "
                   "run starts with)), as simulate --lr-decay (docs/aggregation.md); 0: off. A resume keeps the "
                   "run's.")
@click.option("--no-direct-steps", "no_direct", is_flag=True,
              help="Downlink deltas as canonical chains only: no direct step from the values each agent holds "
                   "(its mirror) to the latest version, which is one step however far behind the agent is.")
@click.option("--float32-install", "float32_install", is_flag=True,
              help="Install the model on agents as float32 even when the run trains with its frozen weights int8 "
                   "(by default those weights go out as int8 with a scale per row, as the agents hold them).")
@click.option("--task-timeout", type=click.FloatRange(min=0.0, min_open=True), default=600.0,
              help="Seconds without an UPDATE before a task is given up (the session is re-established).")
@click.option("--ping-interval", type=click.FloatRange(min=0.0, min_open=True), default=5.0,
              help="Seconds between heartbeats.")
@click.option("--dead-after", type=click.FloatRange(min=0.0, min_open=True), default=30.0,
              help="Seconds of silence after which a connection counts as dead.")
@click.option("--wait-timeout", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Seconds to wait for --min-agents before giving up; default: wait forever.")
@click.option("--stop-grace", type=click.FloatRange(min=0.0), default=10.0,
              help="On SIGTERM/Ctrl-C: seconds to wait for the updates of tasks already sent before stopping.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              help="Log and progress lines as text or JSON lines (stderr).")
@click.option("--seed", type=int, default=0, help="Seed for the model initialisation, scoring and task seeds.")
@click.option("--status", "status_address", default=None, metavar="ADDRESS:PORT",
              help="Serve a read-only live status page (/ and /status.json) here, e.g. 127.0.0.1:8787 (this "
                   "machine) or the hub's LAN address to share it; port 0 picks a free port. Default: off.")
@click.option("-v", "--verbose", is_flag=True, help="Also log debug events (addresses found, duplicates).")
@click.option("--site", is_flag=True,
              help="Run as a site of a multi-site federation (docs/multi-site.md): stay up and train the site "
                   "fleet for --max-versions versions on each global model the site's Flower SuperNode hands over.")
@click.option("--site-socket", default=None, type=click.Path(dir_okay=False),
              help="With --site: the Unix socket the ClientApp connects to; default: OUT/site.sock.")
def train(key_path, model_spec, val_data, out_dir, min_agents, peers, buffer_k, max_versions, target_accuracy,
          interfaces, no_mdns, strategy, lr, local_epochs, batch_size, server_lr, update_bits, downlink_bits,
          base_step_budget, agreement_damping, lr_decay, no_downlink, no_direct, float32_install, task_timeout, ping_interval, dead_after,
          wait_timeout, stop_grace, log_format, seed, status_address,
          verbose,
          site, site_socket):
    """Coordinate federated training over the agents on this network.

    Finds agents over mDNS and --peer, waits for --min-agents, chooses the trainable subset for
    the smallest memory budget, and trains until --target-accuracy or --max-versions. Writes
    OUT/metrics.jsonl (one line per merge), OUT/model.onnx and OUT/summary.json; checkpoints
    after every merge, so running it again with the same --out resumes.
    """
    from ftte_core.protocol import KeyFileError, read_key

    from .logs import setup_logging
    from .train import TrainConfig, TrainError, run_train

    setup_logging(log_format, logging.DEBUG if verbose else logging.INFO)
    _require_onnx("ftte-hub train (it writes model.onnx)")
    try:
        key = read_key(key_path)
    except KeyFileError as e:
        _fail(str(e))
    # which run-shaping flags were typed (a resume compares only those with the checkpoint's policy)
    ctx = click.get_current_context()
    flags = {"model": "model_spec", "strategy": "strategy", "buffer": "buffer_k", "max_versions": "max_versions",
             "lr": "lr", "local_epochs": "local_epochs", "batch_size": "batch_size", "server_lr": "server_lr",
             "seed": "seed"}
    given = frozenset(field for field, param in flags.items()
                      if ctx.get_parameter_source(param) not in (click.core.ParameterSource.DEFAULT,
                                                                 click.core.ParameterSource.DEFAULT_MAP))
    cfg = TrainConfig(model=model_spec, val_data=val_data, out=out_dir, min_agents=min_agents, peers=list(peers),
                      buffer=buffer_k, max_versions=max_versions, target_accuracy=target_accuracy,
                      interfaces=list(interfaces) or None, mdns=not no_mdns, strategy=strategy, lr=lr,
                      local_epochs=local_epochs, batch_size=batch_size, server_lr=server_lr,
                      task_timeout=task_timeout, ping_interval=ping_interval, dead_after=dead_after,
                      wait_timeout=wait_timeout, stop_grace=stop_grace, seed=seed, given=given,
                      update_bits=int(update_bits) if update_bits else None, downlink=not no_downlink,
                      downlink_bits=int(downlink_bits), downlink_direct=not no_direct,
                      int8_install=not float32_install, status=status_address, base_step_budget=base_step_budget,
                      lr_decay=lr_decay, agreement_damping=agreement_damping)
    if site:
        _run_site(cfg, key, site_socket)
        return
    if not model_spec:
        _fail("--model is required (except with --site)")
    try:
        summary = asyncio.run(run_train(cfg, key))
    except TrainError as e:
        _fail(str(e))
    except KeyboardInterrupt:  # a second Ctrl-C: no clean stop
        _fail("interrupted; run again with the same --out to resume")
    except MemoryError:
        _fail("out of memory")
    except Exception as e:  # a bug: still one line, never a traceback (run with python -X dev to debug)
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        _fail(f"internal error: {type(e).__name__}: {msg}")
    if not summary.get("started", True):
        click.echo(f"ftte-hub: {summary['reason']}", err=True)
        return
    _print_summary(summary)


def _run_site(cfg, key, socket_path) -> None:
    """`train --site`: serve global models until a signal (docs/multi-site.md)."""
    from .site import run_site

    try:
        reason = asyncio.run(run_site(cfg, key, socket_path))
    except OSError as e:
        _fail(f"cannot serve the site socket: {e.strerror or e}")
    click.echo(f"ftte-hub: site stopped ({reason})", err=True)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="ftte-demo",
              help="Output folder (replaced if it holds an earlier demo): key, data shards, logs, model.onnx.")
@click.option("--agents", type=click.IntRange(1, 6), default=4, help="Agent processes to start (1..6).")
@click.option("--model", "model_spec", type=click.Choice(["mlp", "cnn"]), default="mlp", help="Zoo model to train.")
@click.option("--target-accuracy", type=click.FloatRange(0.0, 1.0), default=0.95,
              help="Stop once validation accuracy reaches this (0..1).")
@click.option("--max-versions", type=click.IntRange(1), default=400, help="Stop after this many merged versions.")
@click.option("--buffer", "buffer_k", type=click.IntRange(1), default=4, help="K: updates per merge.")
@click.option("--alpha", type=click.FloatRange(min=0.0, min_open=True), default=0.5,
              help="Dirichlet label-skew concentration of the data split (smaller = more skewed).")
@click.option("--seed", type=int, default=0, help="Seed for the split, the model and the tasks.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              help="Hub log and progress lines as text or JSON lines (stderr).")
@click.option("--status", "status_address", is_flag=False, flag_value="127.0.0.1:8787", default=None,
              metavar="[ADDRESS:PORT]",
              help="Serve the live status page (as `ftte-hub train --status`) and print its URL; alone: "
                   "127.0.0.1:8787. Default: off.")
def demo(out_dir, agents, model_spec, target_accuracy, max_versions, buffer_k, alpha, seed, log_format,
         status_address):
    """Run a whole fleet on this machine: the hub plus agent processes found over mDNS.

    Splits the bundled digits non-IID across the agents, gives them different memory budgets
    and slowdowns, trains, and writes OUT/model.onnx and OUT/summary.json.
    """
    from .demo import DemoError, run_demo
    from .logs import setup_logging
    from .train import TrainError

    setup_logging(log_format)
    _require_onnx("ftte-hub demo (it writes model.onnx)")
    t0 = time.perf_counter()
    try:
        summary = run_demo(out=out_dir, agents=agents, model=model_spec, target_accuracy=target_accuracy,
                           max_versions=max_versions, buffer=buffer_k, alpha=alpha, seed=seed,
                           status=status_address, say=lambda m: click.echo(m, err=True))
    except (DemoError, TrainError, ValueError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted")
    _print_summary(summary)
    click.echo(f"demo finished in {time.perf_counter() - t0:.1f} s", err=True)


def _print_summary(s) -> None:
    click.echo(f"accuracy {s['accuracy']:.4f} (start {s['start_accuracy']:.4f}, best {s['best_accuracy']:.4f}) "
               f"at version {s['version']} after {s['time_s']:.1f} s ({s['reason']})")
    click.echo(f"bytes moved: {s['bytes_in']:,} in, {s['bytes_out']:,} out; {s['merged_updates']} updates merged, "
               f"{s['rejected']} rejected")
    click.echo(f"{'agent':<24} {'tasks':>6} {'accepted':>9} {'rejected':>9} {'samples':>9}")
    for aid, a in s["agents"].items():
        note = "  (not used)" if a.get("not_used") else ""
        click.echo(f"{a['name'][:24]:<24} {a['tasks']:>6} {a['accepted']:>9} {a['rejected']:>9} {a['samples']:>9}{note}")
    click.echo(f"wrote {s['outputs']['model']}, {s['outputs']['metrics']}, {s['outputs']['summary']}")


if __name__ == "__main__":
    main()
