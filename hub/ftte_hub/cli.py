"""`ftte-hub`: the coordinator's command line."""
from __future__ import annotations

import sys
import time

import click

from ftte_core.search import parse_size


def _fail(msg: str) -> None:
    click.echo(f"ftte-hub: error: {msg}", err=True)
    sys.exit(2)


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
@click.option("--strategies", default="ftte,fedbuff,fedavg",
              help="Comma list from ftte, ftte-noage, ftte-novar, fedbuff, fedavg.")
@click.option("--dataset", default="digits", help="'digits' (bundled) or a .npz file with x and y.")
@click.option("--alpha", type=click.FloatRange(min=0.0, min_open=True), default=0.5,
              help="Dirichlet label-skew concentration (smaller = more skewed).")
@click.option("--model", type=click.Choice(["mlp", "cnn"]), default="mlp", help="Zoo model to train.")
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
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="ftte-sim", help="Output folder.")
def simulate(clients, stragglers, straggler_slowdown, strategies, dataset, alpha, model, buffer_k, max_versions,
             max_time, samples_per_device, local_epochs, batch_size, lr, server_lr, pretrain_fraction, memory_budget,
             profiles_path, seed, out_dir):
    """Run the fleet on a virtual clock and compare strategies.

    Training is real (the engine, real data, real encoded updates); only time is simulated.
    Writes OUT/results.md, OUT/results.json and OUT/curves.svg.
    """
    from .report import write_results
    from .simulate import SimConfig, simulate as run

    names = [s.strip() for s in strategies.split(",") if s.strip()]
    known = {"ftte", "ftte-noage", "ftte-novar", "fedbuff", "fedavg"}
    bad = [n for n in names if n not in known]
    if bad or not names:
        _fail(f"unknown strategy {', '.join(bad) or '(none given)'}; choose from {', '.join(sorted(known))}")
    try:
        budget = parse_size(memory_budget) if memory_budget else None
        cfg = SimConfig(clients=clients, stragglers=stragglers, straggler_slowdown=straggler_slowdown,
                        strategies=names, dataset=dataset, alpha=alpha, model=model, buffer=buffer_k,
                        max_versions=max_versions, max_time=max_time, samples_per_device=samples_per_device,
                        local_epochs=local_epochs, batch_size=batch_size, lr=lr, server_lr=server_lr,
                        pretrain_fraction=pretrain_fraction, memory_budget=budget,
                        profiles_path=profiles_path, seed=seed)
        t0 = time.perf_counter()
        results = run(cfg, log=lambda m: click.echo(m, err=True))
        paths = write_results(results, out_dir)
    except ValueError as e:  # bad data, profiles, budgets: one line, no traceback
        _fail(str(e))
    click.echo(open(paths["md"]).read())
    click.echo(f"wrote {', '.join(paths.values())} in {time.perf_counter() - t0:.1f} s", err=True)


if __name__ == "__main__":
    main()
