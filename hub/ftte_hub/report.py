"""Simulation results as results.json, results.md and curves.svg (PNG too when matplotlib is there)."""
from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Dict

from ftte_core.atomic import atomic_write

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def markdown(results: Dict) -> str:
    s = results["strategies"]
    lines = [
        f"# Simulation: {results['clients']} devices, {results['stragglers']:.0%} stragglers "
        f"({results['straggler_slowdown']:g}x slower), seed {results['seed']}",
        "",
        f"Dataset {results['dataset']} (Dirichlet alpha {results['alpha']}, "
        f"{'augmented per-device samples' if results['augmented_device_data'] else 'partitioned samples'}, "
        f"{results['samples_per_device']} per device at least), model `{results['model']}`, buffer K = "
        f"{results['buffer']}, {results['max_versions']} versions per strategy, start model "
        f"{results.get('start') or ('pretrained on a small public split' if results['pretrained'] else 'from scratch')} "
        f"(start accuracy {results['start_accuracy']:.3f}). Smallest device budget M_min = "
        f"{_kib(results['memory_budget_min'])}.",
        "",
        f"**Target accuracy: {results['target_accuracy']:.4f}** = {results['target_definition']}; the same "
        "target for every strategy. Times are virtual seconds.",
        "",
        "| strategy | devices (sat out) | time to target (s) | bytes to target | final acc | best acc | "
        "peak device mem (engine) | peak device mem (cost model) | down/task | up/task | down total | up total | "
        "tasks | merges | mean staleness |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:,.1f}"
        btt = "—" if r.get("bytes_to_target") is None else _mib(r["bytes_to_target"])
        lines.append(
            f"| {name} | {r.get('participating_devices', '?')} ({r.get('devices_sat_out', 0)}) | {ttt} | {btt} | "
            f"{r['final_accuracy']:.4f} | {r['best_accuracy']:.4f} | "
            f"{_kib(r['peak_device_memory_bytes'])} | {_kib(r['peak_device_memory_predicted_bytes'])} | "
            f"{_kib(r['bytes_down_per_task'])} | {_kib(r['bytes_up_per_task'])} | {_mib(r['bytes_down_total'])} | "
            f"{_mib(r['bytes_up_total'])} | {r['tasks']} | {r['merges']} | {r['mean_staleness']:.2f} |")
    lines += ["", "Trained parameters per strategy:", ""]
    for name, r in s.items():
        lines.append(f"- **{name}**: {r['trainable_params']:,} parameters — {r['subset']}")
    if "fedavg" in s and "ftte" in s and s["fedavg"]["tasks"] and s["ftte"]["tasks"]:
        f, a = s["ftte"], s["fedavg"]
        lines += ["", "FTTE against FedAvg:", ""]
        if f["time_to_target_s"] is not None and a["time_to_target_s"]:
            lines.append(f"- time to target: {100 * (1 - f['time_to_target_s'] / a['time_to_target_s']):.1f}% less")
        lines.append(f"- peak device training memory: "
                     f"{100 * (1 - f['peak_device_memory_bytes'] / a['peak_device_memory_bytes']):.1f}% less")
        per_task = (f["bytes_down_per_task"] + f["bytes_up_per_task"]) / (a["bytes_down_per_task"] + a["bytes_up_per_task"])
        lines.append(f"- payload per task (down + up): {100 * (1 - per_task):.1f}% less")
        if f.get("bytes_to_target") is not None and a.get("bytes_to_target"):
            ratio = f["bytes_to_target"] / a["bytes_to_target"]
            lines.append(f"- bytes moved until the target (down + up, installs included): {ratio:.2f}x "
                         f"({100 * (1 - ratio):.1f}% {'less' if ratio <= 1 else 'more'})")
        lines.append(f"- final accuracy: {100 * (f['final_accuracy'] - a['final_accuracy']):+.2f} points")
    lines.append("")
    return "\n".join(lines)


def svg(results: Dict, width: int = 760, height: int = 440) -> str:
    """Accuracy against virtual time, one line per strategy; a dashed line marks the target."""
    curves = {n: r["curve"] for n, r in results["strategies"].items()}
    t_max = max((c[-1][0] for c in curves.values() if c), default=1.0) or 1.0
    accs = [p[1] for c in curves.values() for p in c] + [results["target_accuracy"]]
    a_min, a_max = max(0.0, min(accs) - 0.02), min(1.0, max(accs) + 0.02)
    left, right, top, bottom = 64, 170, 36, 52
    pw, ph = width - left - right, height - top - bottom

    def px(t):
        return left + pw * t / t_max

    def py(a):
        return top + ph * (1 - (a - a_min) / max(a_max - a_min, 1e-9))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">Validation accuracy vs virtual time — '
           f'{results["clients"]} devices, {results["stragglers"]:.0%} stragglers</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    for i in range(6):
        t = t_max * i / 5
        a = a_min + (a_max - a_min) * i / 5
        out.append(f'<text x="{px(t):.1f}" y="{top + ph + 18}" text-anchor="middle">{t:,.0f}</text>')
        out.append(f'<text x="{left - 6}" y="{py(a) + 4:.1f}" text-anchor="end">{a:.2f}</text>')
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(a):.1f}" y2="{py(a):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">virtual time (s)</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" transform="rotate(-90 16 {top + ph / 2})" '
               f'text-anchor="middle">accuracy</text>')
    yt = py(results["target_accuracy"])
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yt:.1f}" y2="{yt:.1f}" stroke="#888" stroke-dasharray="5,4"/>')
    out.append(f'<text x="{left + pw + 6}" y="{yt + 4:.1f}" fill="#666">target</text>')
    for i, (name, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = " ".join(f"{px(p[0]):.1f},{py(p[1]):.1f}" for p in curve)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        out.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 36}" y1="{top + 16 + 20 * i}" '
                   f'y2="{top + 16 + 20 * i}" stroke="{colour}" stroke-width="3"/>')
        out.append(f'<text x="{left + pw + 42}" y="{top + 20 + 20 * i}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_results(results: Dict, out_dir: str) -> Dict[str, str]:
    """Write results.json, results.md, curves.svg (and curves.png with matplotlib); return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "svg": out / "curves.svg"}
    _atomic_write(paths["json"], json.dumps(results, indent=2) + "\n")
    _atomic_write(paths["md"], markdown(results))
    _atomic_write(paths["svg"], svg(results))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        pass
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, r in results["strategies"].items():
            c = r["curve"]
            ax.plot([p[0] for p in c], [p[1] for p in c], label=name)
        ax.axhline(results["target_accuracy"], ls="--", color="grey", label="target")
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("validation accuracy")
        ax.legend()
        fig.tight_layout()
        paths["png"] = out / "curves.png"
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    return {k: str(v) for k, v in paths.items()}
