"""Checkpoint + journal: a restarted hub continues where it was; nothing acknowledged is lost."""
import asyncio
import json

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import data as ftdata
from ftte_core.local import LocalWorker, TaskConfig
from ftte_core.protocol import generate_key
from ftte_core.scheduler import RoundDriver
from ftte_core.strategies import make_strategy
from ftte_core.subset import Subset
from ftte_hub import checkpoint as ckpt
from ftte_hub.coordinator import Coordinator
from ftte_hub.fleet import Hooks
from ftte_hub.train import TrainConfig, run_train

from test_hub_fakes import FakeAgent, digits_split

# The hub reads and writes ONNX models; 32-bit ARM has no onnx wheels (docs/raspberry-pi.md).
pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")

KEY = generate_key()


def _driver(model):
    subset = Subset.of(model, {"fc2": {"rows": "all", "bias": True}, "fc3": {"rows": "all", "bias": True}})
    return RoundDriver(model, subset, make_strategy("ftte", buffer_size=3), TaskConfig(lr=0.1, batch_size=16), seed=5)


def replayed(make_driver, model, start, state0, out):
    """(model, driver, coordinator) rebuilt from the start values, a driver state and the journals in ``out``."""
    model.load_state(start)
    driver = make_driver(model)
    driver.load_state_dict(state0)
    coord = Coordinator(driver, out)
    for v in ckpt.journal_versions(out):
        coord.replay(v)
    return model, driver, coord


def test_journal_replay_rebuilds_the_exact_driver_state(tmp_path):
    val, parts = digits_split(3)
    model = ft.zoo("mlp", (1, 8, 8), 10, seed=1)
    start = {k: v.copy() for k, v in model.state().items()}
    driver = _driver(model)
    coord = Coordinator(driver, tmp_path)
    state0 = driver.state_dict()
    coord.open_journal()
    workers = {f"d{i}": (LocalWorker(model.copy(), driver.subset), parts[i]) for i in range(3)}
    tasks = {d: coord.task_for(d) for d in workers}
    for step in range(8):  # 8 arrivals at K=3: two merges and two updates buffered
        d = f"d{step % 3}"
        w, data = workers[d]
        t = tasks[d]
        res = w.run(dict(t.values), t.base_version, data.x, data.y, t.config, bits=t.bits, seed=t.seed, device_id=d)
        res.update.task_id = t.id
        raw = res.update.to_bytes()
        coord.update_from(d, res.update, raw, len(raw))
        tasks[d] = coord.task_for(d)
    coord.gone("d2")
    coord.journal.close_now()
    assert driver.version == 2 and driver.buffered == 2

    again, d2, c2 = replayed(_driver, ft.zoo("mlp", (1, 8, 8), 10, seed=1), start, state0, tmp_path)
    assert d2.version == 2 and d2.buffered == 2
    assert d2.state_dict() == driver.state_dict()
    for k, v in model.state().items():
        np.testing.assert_array_equal(again.state()[k], v)
    assert c2.agents == coord.agents


def test_torn_journal_tail_is_dropped_but_a_broken_middle_is_an_error(tmp_path):
    path = tmp_path / "j.log"
    j = ckpt.Journal(path)
    j.write({"e": "task", "dev": "a", "tid": "t1"})
    j.write({"e": "gone", "dev": "a"})
    j.close_now()
    data = path.read_bytes()
    path.write_bytes(data + ckpt.encode_record({"e": "gone", "dev": "b"})[:-3])  # torn while written
    assert [h["e"] for h, _ in ckpt.read_journal(path)] == ["task", "gone"]
    bad = bytearray(data)
    bad[len(ckpt.JOURNAL_HEADER) + 14] ^= 0xFF  # inside the first record's payload, with a good record after it
    path.write_bytes(bytes(bad))
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        list(ckpt.read_journal(path))


def test_hub_restart_resumes_versions_and_keeps_acknowledged_updates(tmp_path, monkeypatch):
    from ftte_hub import train as train_mod
    made = []   # every strategy the hub builds: the resumed run must rebuild the run's decay

    def recording_make_strategy(*a, **kw):
        made.append(make_strategy(*a, **kw))
        return made[-1]
    monkeypatch.setattr(train_mod, "make_strategy", recording_make_strategy)
    val, parts = digits_split(3)
    vp = tmp_path / "val.npz"
    ftdata.save_npz(vp, val)
    out = tmp_path / "run"

    def cfg(max_versions, **kw):
        return TrainConfig(model="mlp", val_data=str(vp), out=str(out), min_agents=3, mdns=False, buffer=4,
                           max_versions=max_versions, lr=0.1, batch_size=16, ping_interval=1.0, wait_timeout=10.0,
                           peers=[a.address for a in agents], **kw)

    agents = [FakeAgent(KEY, parts[i], f"a{i}") for i in range(3)]

    def acked():
        return {a_["task_id"] for a in agents for a_ in a.acks if a_["accepted"]}

    async def first_run():
        for a in agents:
            await a.start()
        merged = set()
        hooks = Hooks(on_merge=lambda report, t: merged.update(report.task_ids))
        run = asyncio.ensure_future(run_train(cfg(1000, base_step_budget=0.25, lr_decay=2.0, agreement_damping=0.5), KEY, hooks))
        while True:  # "crash" once the version is >= 2 and some acknowledged update waits in the buffer
            await asyncio.sleep(0.001)
            if len(merged) >= 8 and acked() - merged:  # K=4 > 3 agents: acks wait in the buffer
                run.cancel()
                break
        await asyncio.gather(run, return_exceptions=True)

    async def second_run():
        try:
            return await run_train(cfg(8), KEY)
        finally:
            for a in agents:
                await a.close()

    async def main():
        await first_run()
        before = acked()
        meta = ckpt.load_checkpoint(out)[0]
        assert not meta["finished"]
        hash_before = meta["model_hash"]
        run_before = meta["run_id"]
        assert meta["base_step_budget"] == 0.25   # --base-step-budget is the run's: saved, and kept below
        assert meta["lr_decay_merges"] == 6.0     # --lr-decay 2 x the 3 agents at the start, in merges
        assert made[-1].lr_decay_merges == 6.0
        assert meta["agreement_damping"] == 0.5 and made[-1].agreement_damping == 0.5
        made.clear()
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        summary = await second_run()
        return before, hash_before, run_before, lines, summary

    before, hash_before, run_before, lines_before, summary = asyncio.run(main())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    versions = [l["version"] for l in lines]
    assert versions == list(range(1, 9)) and summary["version"] == 8  # continues, never goes back, no repeats
    # the crash came after two merges, but the metrics writer may not have written the second line
    # yet (the resumed hub rewrites it from the journal)
    assert len(lines_before) >= 1 and lines[:len(lines_before)] == lines_before
    merged = {t for l in lines for t in l["tasks"]}
    assert before <= merged, f"acknowledged but never merged: {sorted(before - merged)}"
    meta = ckpt.load_checkpoint(out)[0]
    assert meta["finished"] and meta["model_hash"] == hash_before and meta["base_step_budget"] == 0.25
    # the resume was given no --lr-decay: it rebuilt the run's from the checkpoint
    assert meta["lr_decay_merges"] == 6.0 and made[-1].lr_decay_merges == 6.0
    assert meta["agreement_damping"] == 0.5 and made[-1].agreement_damping == 0.5
    # the run keeps its id across the restart, so updates acknowledged before it still count
    assert meta["run_id"] == run_before == summary["run_id"] and meta["task_prefix"] == run_before[:8] + "-"
    assert all(t.startswith(run_before[:8] + "-t") for t in merged)
    assert all(a.model_downloads == 1 for a in agents)  # the model hash did not change: no second download
    assert sum(a.connections for a in agents) >= 6      # everyone was dialled again


def test_resume_replays_merges_the_checkpoint_missed_and_rewrites_their_metrics(tmp_path, monkeypatch):
    """A crash after merges whose checkpoints never reached the disk: the journal has them."""

    from ftte_hub import train as train_mod

    val, parts = digits_split(3)
    vp = tmp_path / "val.npz"
    ftdata.save_npz(vp, val)
    out = tmp_path / "run"
    agents = [FakeAgent(KEY, parts[i], f"a{i}") for i in range(3)]

    def cfg(max_versions):
        return TrainConfig(model="mlp", val_data=str(vp), out=str(out), min_agents=3, mdns=False, buffer=3,
                           max_versions=max_versions, lr=0.1, batch_size=16, wait_timeout=10.0,
                           peers=[a.address for a in agents])

    async def main():
        for a in agents:
            await a.start()
        # run 1 keeps every journal and, by the end, only its version-0 checkpoint survives
        monkeypatch.setattr(train_mod._Run, "_drop_journals", lambda self, below: None)
        saved = {}
        hooks = Hooks(on_ready=lambda fleet: saved.setdefault("v0", (out / "checkpoint.npz").read_bytes()))
        run = asyncio.ensure_future(run_train(cfg(1000), KEY, hooks))
        while len((out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []) < 5:
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        monkeypatch.undo()
        (out / "checkpoint.npz").write_bytes(saved["v0"])
        lines = (out / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text(lines[0] + "\n")   # as if later lines never reached the disk
        reached = max(json.loads(l)["version"] for l in lines)
        try:
            summary = await run_train(cfg(reached + 6), KEY)
        finally:
            for a in agents:
                await a.close()
        return reached, summary

    reached, summary = asyncio.run(main())
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["version"] for l in lines] == list(range(1, reached + 7))
    assert all(l.get("replayed") for l in lines[1:reached]) and not lines[0].get("replayed")
    # the journal may hold a merge or two past `reached` whose lines the writer had not written
    # when the run was cut (a slow machine): those are replayed too; after them every merge is new
    flags = [bool(l.get("replayed")) for l in lines[1:]]
    first_new = flags.index(False)
    assert not any(flags[first_new:]) and first_new >= reached - 1
    assert summary["version"] == reached + 6


def test_malformed_updates_go_through_the_driver_and_replay(tmp_path):
    # issue 9 seam: the hub used to bump driver.rejected["malformed"] itself, unjournaled
    model = ft.zoo("mlp", (1, 8, 8), 10, seed=1)
    driver = _driver(model)
    coord = Coordinator(driver, tmp_path)
    state0 = driver.state_dict()
    coord.open_journal()
    coord.task_for("d0")
    assert coord.malformed_from("d0", "garbage", 200) > 0
    coord.journal.close_now()
    assert driver.rejected["malformed"] == 1 and coord.agents["d0"]["rejected"] == 1

    again = ft.zoo("mlp", (1, 8, 8), 10, seed=1)
    d2 = _driver(again)
    d2.load_state_dict(state0)
    c2 = Coordinator(d2, tmp_path)
    for v in ckpt.journal_versions(tmp_path):
        c2.replay(v)
    assert d2.state_dict() == driver.state_dict() and c2.agents == coord.agents
