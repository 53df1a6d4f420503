"""ftte-hub train --strategy ftte-tiered: nested subsets per budget tier, over the network."""
import asyncio
import json
import struct

import numpy as np
import pytest

import ftte_core as ft
from ftte_core.cost import predict_memory
from ftte_core.local import LocalWorker, TaskConfig
from ftte_core.protocol import generate_key
from ftte_core.scheduler import RoundDriver
from ftte_core.search import tier_budgets
from ftte_core.strategies import make_strategy
from ftte_core.subset import Subset, subset_contains
from ftte_hub import checkpoint as ckpt
from ftte_hub.coordinator import Coordinator
from ftte_hub.fleet import Hooks

from test_hub_fakes import FakeAgent, digits_split
from test_hub_resume import replayed
from test_hub_train import KEY, _config

# The hub reads and writes ONNX models; 32-bit ARM has no onnx wheels (docs/raspberry-pi.md).
pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")


def _full_step(batch_size=16):
    m = ft.zoo("mlp", (1, 8, 8), 10, seed=0)
    return m, int(predict_memory(m, Subset.full(m), batch_size)["total"])


def test_tier_budgets_keep_the_smallest_and_largest_and_are_bounded():
    assert tier_budgets([5, 1, 3, 3]) == [1, 3, 5]
    assert tier_budgets(range(1, 11), max_tiers=4) == [1, 4, 7, 10]
    assert tier_budgets(range(1, 11), max_tiers=None) == list(range(1, 11))


def test_agents_of_two_budgets_train_nested_subsets_and_a_late_agent_takes_the_tier_it_fits(tmp_path):
    """A small and a big agent at the start: two tiers, each agent gets its own (the small one's
    fits its budget and is inside the big one's), merges mix both. An agent joining later with a
    budget between the tiers trains the smaller one; one below every tier sits out (NOT_USED)."""
    val, parts = digits_split(4)
    model, full = _full_step()
    small_budget, big_budget = full // 2, 4 * full
    fleets, snapshots = [], []

    async def main():
        small = FakeAgent(KEY, parts[0], "small", budget=small_budget, downlink="on")
        big = FakeAgent(KEY, parts[1], "big", budget=big_budget, downlink="on")
        middle = FakeAgent(KEY, parts[2], "middle", budget=full * 9 // 10)
        tiny = FakeAgent(KEY, parts[3], "tiny", budget=full // 8)
        agents = [small, big, middle, tiny]
        for a in agents:
            await a.start()
        late = [middle, tiny]

        def ready(fleet):
            fleets.append(fleet)
            for a in late:
                fleet.add_address("127.0.0.1", a.port, "peer")

        def merged(line):  # the status page's view of the run, as a merge is recorded
            if line["version"] >= 3 and not snapshots:
                from ftte_hub.status import StatusView
                snapshots.append(StatusView(fleets[0].on_fatal.__self__).snapshot())  # on_fatal: the run's _fail

        hooks = Hooks(on_ready=ready, on_metrics=merged)
        cfg = _config(tmp_path, val, [small, big], strategy="ftte-tiered", buffer=2, max_versions=6)
        from ftte_hub.train import run_train
        from slowdev import scaled
        try:
            summary = await asyncio.wait_for(run_train(cfg, KEY, hooks), scaled(300))
        finally:
            for a in agents:
                await a.close()
        return summary, agents

    summary, (small, big, middle, tiny) = asyncio.run(main())
    assert summary["version"] == 6 and summary["strategy"] == "ftte-tiered"
    tiers = summary["tiers"]
    assert len(tiers) == 2 and tiers[0]["trainable_params"] < tiers[1]["trainable_params"]
    assert tiers[0]["predicted_bytes"] <= small_budget < tiers[1]["predicted_bytes"] <= big_budget
    s_small = {json.dumps(s, sort_keys=True) for s in small.subsets}
    s_big = {json.dumps(s, sort_keys=True) for s in big.subsets}
    assert len(s_small) == 1 and len(s_big) == 1 and s_small != s_big   # one tier each, different
    sub_small = Subset.from_dict(model, small.subsets[0])
    sub_big = Subset.from_dict(model, big.subsets[0])
    assert subset_contains(sub_big, sub_small)                         # nested
    # the subset a task carries fits the agent's budget (the frozen setting the task says)
    frozen = json.loads((tmp_path / "run" / "summary.json").read_text()) and \
        ckpt.load_checkpoint(tmp_path / "run")[0]["task_config"].get("frozen", "float32")
    assert predict_memory(model, sub_small, 16, frozen=frozen)["total"] <= small_budget
    assert summary["agents"]["small"]["tier"] == 0 and summary["agents"]["big"]["tier"] == 1
    assert summary["agents"]["small"]["accepted"] >= 1 and summary["agents"]["big"]["accepted"] >= 1
    # the late agents: between the tiers -> the smaller one (if it got a task before the end); below -> not used
    assert all(json.dumps(s, sort_keys=True) in s_small for s in middle.subsets)
    assert tiny.not_used is not None and tiny.tasks == 0
    # downlink deltas per tier: each agent's stream resolves (no resync) and goes on with deltas
    assert small.resyncs == 0 and big.resyncs == 0 and "delta" in small.frames + big.frames
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seen = {t for l in lines for t in l["tiers"]}
    assert seen == {0, 1}                                              # merges took both tiers' updates
    assert all(len(l["tiers"]) == len(l["devices"]) for l in lines)
    # the status page: the run's tiers, and each agent's under its budget
    snap = snapshots[0]
    assert [t["trainable_params"] for t in snap["subset"]["tiers"]] == [t["trainable_params"] for t in tiers]
    by_id = {a["agent_id"]: a for a in snap["agents"]}
    assert by_id["small"]["tier"] == 0 and by_id["big"]["tier"] == 1 and by_id.get("tiny", {}).get("tier") is None


def test_a_tiered_journal_replays_each_devices_tier_from_its_budget(tmp_path):
    """The tier a device trains comes from its budget; a replay from a checkpoint taken before it
    joined (the journal's join carries the budget) or after (the checkpoint keeps the budgets)
    issues the same tasks and rebuilds the same state."""
    _val, parts = digits_split(2)
    model, full = _full_step()
    start = {k: v.copy() for k, v in model.state().items()}
    small = Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
    big = Subset.of(model, {"fc2": {"rows": "all", "bias": True}, "fc3": {"rows": "all", "bias": True}})
    budgets = {"d0": 1 << 18, "d1": 1 << 22}

    def driver(m):
        strategy = make_strategy("ftte-tiered", buffer_size=2, tiers=[small, big], tier_bytes=[1 << 17, 1 << 20])
        return RoundDriver(m, None, strategy, TaskConfig(lr=0.1, batch_size=16), seed=3)

    d = driver(model)
    coord = Coordinator(d, tmp_path)
    state0 = d.state_dict()
    coord.open_journal()
    for dev, b in budgets.items():
        coord.joined(dev, {"memory_budget": b, "num_samples": len(parts[int(dev[1])])})
    tasks = {dev: coord.task_for(dev) for dev in budgets}
    assert tasks["d0"].subset == small and tasks["d1"].subset == big
    for step in range(5):
        dev = f"d{step % 2}"
        t, data = tasks[dev], parts[step % 2]
        res = LocalWorker(model.copy(), t.subset).run(dict(t.values), t.base_version, data.x, data.y, t.config,
                                                      bits=t.bits, seed=t.seed, device_id=dev)
        res.update.task_id = t.id
        raw = res.update.to_bytes()
        assert coord.update_from(dev, res.update, raw, len(raw))[0].accepted
        tasks[dev] = coord.task_for(dev)
    coord.journal.close_now()
    assert d.version == 2 and coord.agents["d0"]["tier"] == 0 and coord.agents["d1"]["tier"] == 1
    assert d.state_dict()["meta"]["device_budgets"] == budgets

    again, d2, _ = replayed(driver, ft.zoo("mlp", (1, 8, 8), 10, seed=0), start, state0, tmp_path)
    assert d2.state_dict() == d.state_dict()
    for k, v in model.state().items():
        np.testing.assert_array_equal(again.state()[k], v)
    # a driver restored from the later checkpoint knows the budgets without any join
    d3 = driver(again.copy())
    d3.load_state_dict(d.state_dict())
    assert d3.device_idle("d1").subset == big and d3.device_idle("d0").subset == small


@pytest.mark.slow
def test_tiered_hub_and_agent_processes_reach_accuracy_and_a_resume_keeps_the_tiers(tmp_path):
    """Real `ftte-agent` processes of two budget tiers (--peer on loopback): ftte-tiered gives the
    small ones w* and the big one a superset; the hub is killed mid-run and the same command
    resumes with the same tiers, each agent on its tier, up to the target accuracy."""
    import os
    import signal
    import subprocess
    import sys

    from ftte_core import data as ftdata
    from ftte_core.protocol import write_key
    from slowdev import scaled, wait_for_progress
    from test_hub_processes import _metrics, _wait

    write_key(tmp_path / "fleet.key", generate_key())
    train, val = ftdata.train_val_split(ftdata.load_bundled("digits"), val_fraction=0.2, seed=0)
    ftdata.save_npz(tmp_path / "val.npz", val)
    budgets = ["340KiB", "340KiB", "1MiB"]
    procs, peers = [], []
    env = dict(os.environ, FTTE_NUM_THREADS="1")

    def free_port():
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    try:
        for i, part in enumerate(ftdata.partition_dirichlet(train, 3, alpha=1.0, seed=0, min_size=20)):
            ftdata.save_npz(tmp_path / f"data{i}.npz", part)
            port = free_port()
            peers += ["--peer", f"127.0.0.1:{port}"]
            procs.append(subprocess.Popen(
                [sys.executable, "-c", "from ftte_agent.cli import main; main()", "--key", str(tmp_path / "fleet.key"),
                 "--data", str(tmp_path / f"data{i}.npz"), "--name", f"pa{i}", "--memory-budget", budgets[i],
                 "--port", str(port), "--no-mdns", "--interface", "127.0.0.1", "--state-dir", str(tmp_path / f"s{i}")],
                stdout=open(tmp_path / f"agent{i}.log", "ab"), stderr=subprocess.STDOUT, env=env))

        def hub():
            p = subprocess.Popen([sys.executable, "-c", "from ftte_hub.cli import main; main()", "train",
                                  "--key", str(tmp_path / "fleet.key"), "--model", "mlp", "--val-data",
                                  str(tmp_path / "val.npz"), "--out", str(tmp_path / "run"), "--min-agents", "3",
                                  "--no-mdns", *peers, "--strategy", "ftte-tiered", "--buffer", "3", "--batch-size",
                                  "16", "--lr", "0.1", "--ping-interval", "1", "--max-versions", "300",
                                  "--target-accuracy", "0.9"],
                                 stdout=open(tmp_path / "hub.log", "ab"), stderr=subprocess.STDOUT, env=env)
            procs.append(p)
            return p

        first = hub()
        # killed early (at its first merge): a resume that starts near the target can reach it
        # with one merge of the fast tier's updates alone, and both tiers must merge after it
        _wait(lambda: len(_metrics(tmp_path)) >= 1, 90, "a merge", tmp_path)
        os.kill(first.pid, signal.SIGKILL)              # the hub dies mid-run
        first.wait(scaled(10))
        tiers_before = ckpt.load_checkpoint(tmp_path / "run")[0]["tiers"]
        seen = len(_metrics(tmp_path))
        second = hub()                                  # same command: resume
        wait_for_progress(lambda: second.poll() is not None, lambda: (tmp_path / "hub.log").stat().st_size,
                          "the resumed hub's exit", stall=60,
                          describe=lambda: (tmp_path / "hub.log").read_text()[-3000:])
        assert second.wait() == 0, (tmp_path / "hub.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(scaled(10))
    log = (tmp_path / "hub.log").read_text()
    assert "resumed from" in log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accuracy"] >= 0.9 and summary["reason"].startswith("reached --target-accuracy")
    assert len(summary["tiers"]) == 2 and ckpt.load_checkpoint(tmp_path / "run")[0]["tiers"] == tiers_before
    by_name = {a["name"]: a for a in summary["agents"].values()}
    assert by_name["pa0"]["tier"] == by_name["pa1"]["tier"] == 0 and by_name["pa2"]["tier"] == 1
    after = _metrics(tmp_path)[seen:]
    assert after and {t for m in after for t in m["tiers"]} == {0, 1}   # both tiers merged after the resume
    assert all(a["failed"] == 0 for a in summary["agents"].values())  # no agent refused its tier's task
    for i in range(3):
        alog = (tmp_path / f"agent{i}.log").read_text()
        assert "Traceback" not in alog, alog[-2000:]
    # each agent got its tier's install once: the resumed hub rebuilt the same bytes (same hash,
    # found cached), and with frozen weights int8 the small tier's is model file version 4 (its
    # trained rows int8 too: the run started from their int8 round trip)
    frozen = ckpt.load_checkpoint(tmp_path / "run")[0]["task_config"].get("frozen", "float32")
    plain = (tmp_path / "run" / ckpt.INITIAL_MODEL).stat().st_size
    for i in range(3):
        files = list((tmp_path / f"s{i}" / "models").iterdir())
        assert len(files) == 1, files
        version = struct.unpack_from("<H", files[0].read_bytes(), 4)[0]
        if i < 2:  # (340 KiB at batch 16 holds w* only with frozen weights int8)
            assert frozen == "int8" and version == 4 and files[0].stat().st_size < 0.6 * plain
        assert (tmp_path / f"agent{i}.log").read_text().count("received and cached") == 1
