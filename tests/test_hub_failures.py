"""Issue 9, findings 3 and 11 (hub side): local failures end the run with one line; nothing hangs.

Every test bounds the run with asyncio.wait_for: before these fixes each of them hung forever
(the failure ended a dial loop or the merge processor silently).
"""
import asyncio
import errno
import logging

import pytest
from click.testing import CliRunner

import ftte_core as ft
from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, write_key
from ftte_hub import checkpoint as ckpt
from ftte_hub import fleet as fleet_mod
from ftte_hub import train as train_mod
from ftte_hub.cli import main as hub_cli
from ftte_hub.fleet import Hooks
from ftte_hub.train import TrainConfig, TrainError, run_train

from slowdev import scaled
from test_hub_fakes import FakeAgent, digits_split

pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")

KEY = generate_key()
BOUND = scaled(120.0)  # generous: only a hang reaches it


def _cfg(tmp_path, val, peers, **kw):
    p = tmp_path / "val.npz"
    ftdata.save_npz(p, val)
    base = dict(model="mlp", val_data=str(p), out=str(tmp_path / "run"), peers=peers, mdns=False, buffer=2,
                max_versions=4, batch_size=16, wait_timeout=scaled(20.0), min_agents=2)
    base.update(kw)
    return TrainConfig(**base)


def _run(tmp_path, n=2, hooks=None, **kw):
    val, parts = digits_split(n)

    async def main():
        agents = [FakeAgent(KEY, parts[i], f"a{i}") for i in range(n)]
        for a in agents:
            await a.start()
        try:
            cfg = _cfg(tmp_path, val, [a.address for a in agents], min_agents=n, **kw)
            return await asyncio.wait_for(run_train(cfg, KEY, hooks), BOUND)
        finally:
            for a in agents:
                await a.close()

    return asyncio.run(main())


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_round_driver_that_raises_ends_the_run_with_one_line(tmp_path):
    # the CNN hang: a merge into read-only weights raised inside a session and ended its dial loop
    def break_driver(fleet):
        def update_arrived(*a, **k):
            raise ValueError("merge_int8: target must be writable")
        fleet.coordinator.driver.update_arrived = update_arrived

    with pytest.raises(TrainError, match=r"the round driver failed on an update from a\d: ValueError: "
                                         r"merge_int8: target must be writable") as e:
        _run(tmp_path, hooks=Hooks(on_ready=break_driver))
    assert "\n" not in str(e.value)


def test_onnx_cnn_trains_to_the_end(tmp_path):
    # finding 11: a zoo CNN exported to ONNX (read-only weights once loaded) hung after the first update
    path = tmp_path / "cnn.onnx"
    ft.save_onnx(ft.zoo("cnn", input_shape=(1, 8, 8), num_classes=10), str(path))
    summary = _run(tmp_path, model=str(path), max_versions=3)
    assert summary["version"] == 3


def test_journal_write_failure_ends_the_run(tmp_path, monkeypatch):
    real = ckpt.Journal.write
    calls = []

    def write(self, header, blob=b""):
        calls.append(header.get("e"))
        if header.get("e") == "update":
            _enospc()
        return real(self, header, blob)

    monkeypatch.setattr(ckpt.Journal, "write", write)
    with pytest.raises(TrainError, match=r"cannot write the journal: No space left on device"):
        _run(tmp_path)


def test_journal_fsync_failure_ends_the_run(tmp_path, monkeypatch):
    async def fsync(self):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.Journal, "_fsync", fsync)
    with pytest.raises(TrainError, match=r"cannot sync the journal: Input/output error"):
        _run(tmp_path)


def test_metrics_write_failure_ends_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod._Run, "_record_metrics", lambda self, *a, **k: _enospc())
    with pytest.raises(TrainError, match=r"cannot append to .*metrics.jsonl: No space left on device"):
        _run(tmp_path)


def test_checkpoint_write_failure_after_a_merge_ends_the_run(tmp_path, monkeypatch):
    real = ckpt.save_checkpoint
    calls = []

    def save(*a, **k):
        calls.append(1)
        if len(calls) > 1:  # the initial checkpoint goes through, the first after a merge does not
            _enospc()
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    with pytest.raises(TrainError, match=r"cannot write the checkpoint in .*: No space left on device"):
        _run(tmp_path)


def test_checkpoint_write_failure_at_the_last_merge_ends_the_run(tmp_path, monkeypatch):
    # the run was finishing (waiting for the merge processor) when the processor failed: no hang
    real = ckpt.save_checkpoint

    def save(out, meta, *a, **k):
        if meta["version"] >= 2:
            _enospc()
        return real(out, meta, *a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    with pytest.raises(TrainError, match=r"cannot write the checkpoint in .*: No space left on device"):
        _run(tmp_path, max_versions=2)


def test_final_output_write_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod.ft, "save_onnx", lambda *a, **k: _enospc())
    with pytest.raises(TrainError, match=r"cannot write the run's outputs.*No space left on device"):
        _run(tmp_path, max_versions=2)


def test_out_of_fds_while_dialling_is_retried(tmp_path, monkeypatch, caplog):
    real = asyncio.open_connection
    fails = []

    async def open_connection(*a, **k):
        if len(fails) < 3:
            fails.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return await real(*a, **k)

    monkeypatch.setattr(fleet_mod.asyncio, "open_connection", open_connection)
    monkeypatch.setattr(fleet_mod, "BACKOFF_MIN", 0.05)
    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary = _run(tmp_path)
    assert summary["version"] == 4 and len(fails) == 3
    assert any("Too many open files (retrying)" in r.getMessage() for r in caplog.records)


def test_a_bug_in_a_session_costs_one_line_and_a_redial(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(fleet_mod, "BACKOFF_MIN", 0.05)
    boom = []

    def on_task_sent(agent_id, task, t):
        if not boom:
            boom.append(agent_id)
            raise KeyError("a bug")

    with caplog.at_level(logging.INFO, logger="ftte_hub"):
        summary = _run(tmp_path, hooks=Hooks(on_task_sent=on_task_sent))
    assert summary["version"] == 4
    lines = [r.getMessage() for r in caplog.records if "session failed (KeyError" in r.getMessage()]
    assert len(lines) == 1


def test_journal_path_that_is_a_directory_is_one_line_and_nonzero_exit(tmp_path):
    val, parts = digits_split(1)
    ftdata.save_npz(tmp_path / "val.npz", val)
    write_key(tmp_path / "fleet.key", KEY)
    out = tmp_path / "run"
    (out / "journal" / "00000000.log" / "x").mkdir(parents=True)   # not removable by the leftover cleanup

    async def serve():
        a = FakeAgent(KEY, parts[0], "a")
        await a.start()
        return a

    loop = asyncio.new_event_loop()
    try:
        agent = loop.run_until_complete(serve())
        import threading
        t = threading.Thread(target=loop.run_forever, daemon=True)
        t.start()
        r = CliRunner().invoke(hub_cli, ["train", "--key", str(tmp_path / "fleet.key"), "--model", "mlp",
                                         "--val-data", str(tmp_path / "val.npz"), "--out", str(out), "--no-mdns",
                                         "--peer", agent.address, "--wait-timeout", str(scaled(20)), "--batch-size", "16"])
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.run_until_complete(agent.close())
        loop.close()
    assert r.exit_code == 2, r.output
    err = [l for l in r.output.splitlines() if l.startswith("ftte-hub: error:")]
    assert len(err) == 1 and "cannot open the journal" in err[0] and "Is a directory" in err[0]
    assert "Traceback" not in r.output


def test_an_unwritable_out_folder_is_one_line(tmp_path, monkeypatch):
    real = train_mod.atomic_write

    def atomic_write(path, *a, **k):
        if str(path).endswith(ckpt.INITIAL_MODEL):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(train_mod, "atomic_write", atomic_write)
    with pytest.raises(TrainError, match=r"cannot use .*initial-model.ftmd: Permission denied"):
        _run(tmp_path)
