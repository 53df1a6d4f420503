"""Issue 9, findings 8 and 10: a clean, resumable stop on SIGTERM; resume under the saved policy."""
import asyncio
import json
import os
import signal

import pytest

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key
from ftte_hub import checkpoint as ckpt
from ftte_hub import train as train_mod
from ftte_hub.fleet import Hooks
from ftte_hub.train import TrainConfig, TrainError, run_train

from slowdev import scaled
from test_hub_fakes import FakeAgent, digits_split

pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")

KEY = generate_key()
BOUND = scaled(120.0)


class Killed(Exception):
    pass


@pytest.fixture
def sigterm_guard():
    """Before the fix SIGTERM killed the process: turn it into an exception instead of killing pytest."""
    def raise_(*a):
        raise Killed("SIGTERM was not handled by the hub")
    old = signal.signal(signal.SIGTERM, raise_)
    yield
    signal.signal(signal.SIGTERM, old)


def _lines(out):
    p = out / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def test_sigterm_stops_cleanly_and_the_same_command_resumes_with_byte_totals(tmp_path, sigterm_guard):
    val, parts = digits_split(3)
    vp = tmp_path / "val.npz"
    ftdata.save_npz(vp, val)
    out = tmp_path / "run"
    agents = [FakeAgent(KEY, parts[i], f"a{i}") for i in range(3)]

    def cfg(max_versions):
        return TrainConfig(model="mlp", val_data=str(vp), out=str(out), min_agents=3, mdns=False, buffer=2,
                           max_versions=max_versions, lr=0.1, batch_size=16, wait_timeout=scaled(10.0),
                           peers=[a.address for a in agents])

    fleets = []

    async def main():
        for a in agents:
            await a.start()
        try:
            run = asyncio.ensure_future(run_train(cfg(1000), KEY, Hooks(on_ready=fleets.append)))
            while len(_lines(out)) < 3:
                await asyncio.sleep(0.01)
                assert not run.done(), run.result()
            os.kill(os.getpid(), signal.SIGTERM)
            first = await asyncio.wait_for(run, BOUND)
            stopped = [a.stopped for a in agents]
            meta = ckpt.load_checkpoint(out)[0]
            second = await asyncio.wait_for(run_train(cfg(meta["version"] + 3), KEY, Hooks(on_ready=fleets.append)),
                                            BOUND)
            return first, stopped, meta, second
        finally:
            for a in agents:
                await a.close()

    first, stopped, meta, second = asyncio.run(main())
    assert first["finished"] is False and "SIGTERM" in first["reason"]
    assert all(s and "SIGTERM" in s for s in stopped)                     # every agent got STOP
    assert not meta["finished"] and meta["version"] == first["version"]
    assert meta["transport"]["bytes_in"] == first["bytes_in"] > 0
    assert (out / "model.onnx").exists()
    # resumed: the versions go on, and the byte counts cover both processes
    assert second["finished"] and second["version"] == first["version"] + 3
    versions = [l["version"] for l in _lines(out)]
    assert versions == list(range(1, second["version"] + 1))
    b_in, b_out = fleets[1].bytes_totals()
    own_in = b_in - fleets[1].bytes_before[0]
    assert fleets[1].bytes_before == (first["bytes_in"], first["bytes_out"])
    assert second["bytes_in"] == first["bytes_in"] + own_in and own_in > 0
    assert second["bytes_out"] > first["bytes_out"]


def test_sigterm_while_waiting_for_agents_exits_cleanly(tmp_path, sigterm_guard):
    val, _ = digits_split(1)
    vp = tmp_path / "val.npz"
    ftdata.save_npz(vp, val)

    async def main():
        run = asyncio.ensure_future(run_train(TrainConfig(model="mlp", val_data=str(vp), out=str(tmp_path / "run"),
                                                          mdns=False, peers=["127.0.0.1:9"]), KEY))
        await asyncio.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(run, BOUND)

    summary = asyncio.run(main())
    assert summary["started"] is False and "SIGTERM" in summary["reason"]


def _crashed_run(tmp_path, monkeypatch, buffer=3):
    """A run 'crashed' after >= 4 merges, with only its version-0 checkpoint and every journal on disk."""
    val, parts = digits_split(3)
    vp = tmp_path / "val.npz"
    ftdata.save_npz(vp, val)
    out = tmp_path / "run"
    agents = [FakeAgent(KEY, parts[i], f"a{i}") for i in range(3)]

    def cfg(**kw):
        base = dict(model="mlp", val_data=str(vp), out=str(out), min_agents=3, mdns=False, buffer=buffer,
                    max_versions=1000, lr=0.1, batch_size=16, wait_timeout=scaled(10.0), peers=[a.address for a in agents])
        base.update(kw)
        return TrainConfig(**base)

    async def first():
        for a in agents:
            await a.start()
        monkeypatch.setattr(train_mod._Run, "_drop_journals", lambda self, below: None)
        saved = {}
        hooks = Hooks(on_ready=lambda fleet: saved.setdefault("v0", (out / "checkpoint.npz").read_bytes()))
        run = asyncio.ensure_future(run_train(cfg(), KEY, hooks))
        while len(_lines(out)) < 4:
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        monkeypatch.undo()
        (out / "checkpoint.npz").write_bytes(saved["v0"])

    async def close():
        for a in agents:
            await a.close()

    return out, cfg, first, close


def test_resume_with_a_lower_max_versions_replays_under_the_saved_policy_then_applies_it(tmp_path, monkeypatch, caplog):
    # before: the driver was rebuilt with the new --max-versions, refused the journal's tasks, and
    # the resume died with "journal and checkpoint disagree"
    import logging

    out, cfg, first, close = _crashed_run(tmp_path, monkeypatch)

    async def main():
        try:
            await first()
            return await asyncio.wait_for(run_train(cfg(max_versions=2), KEY), BOUND)
        finally:
            await close()

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary = asyncio.run(main())
    assert summary["version"] >= 4            # what the journal holds is replayed, never thrown away
    msgs = [r.getMessage() for r in caplog.records]
    assert any("resuming with --max-versions 2 (was 1000), from version" in m for m in msgs)
    meta = ckpt.load_checkpoint(out)[0]
    assert meta["policy"]["max_versions"] == 2


def test_resume_with_a_different_buffer_is_refused_with_one_line(tmp_path, monkeypatch):
    out, cfg, first, close = _crashed_run(tmp_path, monkeypatch)

    async def main():
        try:
            await first()
            with pytest.raises(TrainError, match=r"cannot resume .* with --buffer 5: the run uses --buffer 3 "
                                                 r"\(leave --buffer out to resume"):
                await asyncio.wait_for(run_train(cfg(buffer=5), KEY), BOUND)
            # flags not typed on the command line take the checkpoint's values
            return await asyncio.wait_for(run_train(cfg(buffer=5, max_versions=6, given=frozenset({"max_versions"})),
                                                    KEY), BOUND)
        finally:
            await close()

    summary = asyncio.run(main())
    assert summary["version"] >= 6
    meta = ckpt.load_checkpoint(out)[0]
    assert meta["buffer"] == 3 and meta["policy"]["buffer"] == 3


def test_resume_applies_a_new_learning_rate_from_the_next_version(tmp_path, monkeypatch):
    out, cfg, first, close = _crashed_run(tmp_path, monkeypatch)
    sent = []

    async def main():
        try:
            await first()
            hooks = Hooks(on_task_sent=lambda aid, task, t: sent.append(task))
            return await asyncio.wait_for(run_train(cfg(lr=0.02, max_versions=8), KEY, hooks), BOUND)
        finally:
            await close()

    summary = asyncio.run(main())
    assert sent and all(t.config.lr == 0.02 for t in sent)
    meta = ckpt.load_checkpoint(out)[0]
    assert meta["policy"]["lr"] == 0.02 and meta["task_config"]["lr"] == 0.02 and summary["version"] == 8


def test_resume_with_another_model_is_refused_but_the_same_file_by_another_path_is_not(tmp_path, monkeypatch):
    out, cfg, first, close = _crashed_run(tmp_path, monkeypatch)

    async def main():
        try:
            await first()
            with pytest.raises(TrainError, match=r"with --model cnn: the run uses --model mlp \(give the same --model"):
                await asyncio.wait_for(run_train(cfg(model="cnn"), KEY), BOUND)
        finally:
            await close()

    asyncio.run(main())
    assert train_mod.same_file(str(tmp_path / "val.npz"), str(tmp_path / "." / "val.npz"))
    assert not train_mod.same_file("mlp", "cnn")
