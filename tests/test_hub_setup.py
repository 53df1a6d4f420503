"""ftte-hub keygen, model setup from data, and the refusals before a run starts."""
import asyncio
import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner

import ftte_core as ft
from ftte_core import data as ftdata
from ftte_core.protocol import generate_key, read_key
from ftte_hub.cli import main as hub_cli
from ftte_hub.train import TrainConfig, TrainError, build_model, run_train

from test_hub_fakes import FakeAgent, digits_split

# The hub reads and writes ONNX models; 32-bit ARM has no onnx wheels (docs/raspberry-pi.md).
pytest.importorskip("onnx", reason="the hub needs the onnx package (none for armv7)")

KEY = generate_key()


def test_keygen_writes_a_0600_key_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "fleet.key"
    r = CliRunner().invoke(hub_cli, ["keygen", str(path)])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = read_key(path)
    assert len(key) == 32
    r = CliRunner().invoke(hub_cli, ["keygen", str(path)])
    assert r.exit_code != 0 and "already exists" in r.output and "--force" in r.output
    assert read_key(path) == key  # untouched
    r = CliRunner().invoke(hub_cli, ["keygen", "--force", str(path)])
    assert r.exit_code == 0 and read_key(path) != key


def test_zoo_model_takes_shape_and_classes_from_the_data():
    val, _ = digits_split(2)
    model = build_model("mlp", val)
    assert model.input_shape == (1, 8, 8) and model.num_classes == 10
    cnn = build_model("cnn", val)
    assert cnn.input_shape == (1, 8, 8) and cnn.num_classes == 10
    five = ftdata.Dataset(np.zeros((6, 12), np.float32), np.arange(6) % 5, 5, "five")
    assert build_model("mlp", five).input_shape == (12,) and build_model("mlp", five).num_classes == 5


def test_onnx_model_mismatching_the_data_is_a_one_line_error(tmp_path):
    val, _ = digits_split(2)
    wrong_input = tmp_path / "wide.onnx"
    ft.save_onnx(ft.zoo("mlp", (1, 28, 28), 10), str(wrong_input))
    with pytest.raises(TrainError, match=r"takes inputs of shape \[1, 28, 28\].*\[1, 8, 8\]") as e:
        build_model(str(wrong_input), val)
    assert "\n" not in str(e.value)
    few_classes = tmp_path / "three.onnx"
    ft.save_onnx(ft.zoo("mlp", (64,), 3), str(few_classes))
    with pytest.raises(TrainError, match="has 3 outputs, but the validation data has 10 classes"):
        build_model(str(few_classes), val)
    good = tmp_path / "good.onnx"
    ft.save_onnx(ft.zoo("cnn", (1, 8, 8), 10), str(good))
    assert build_model(str(good), val).num_classes == 10
    with pytest.raises(TrainError, match="neither a zoo model"):
        build_model("resnet9000", val)
    with pytest.raises(TrainError, match="does not exist"):
        build_model(str(tmp_path / "missing.onnx"), val)


def _cfg(tmp_path, val, peers, **kw):
    p = tmp_path / "val.npz"
    ftdata.save_npz(p, val)
    base = dict(model="mlp", val_data=str(p), out=str(tmp_path / "run"), peers=peers, mdns=False, buffer=2,
                max_versions=3, batch_size=16, wait_timeout=10.0)
    base.update(kw)
    return TrainConfig(**base)


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    val, _ = digits_split(2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.npz").write_bytes(b"PK\x03\x04 this is no checkpoint")
    with pytest.raises(TrainError, match="corrupt") as e:
        asyncio.run(run_train(_cfg(tmp_path, val, ["127.0.0.1:9"]), KEY))
    assert "\n" not in str(e.value)
    assert (out / "checkpoint.npz").read_bytes().endswith(b"no checkpoint")  # left for the user to inspect
    r = CliRunner().invoke(hub_cli, ["train", "--key", str(tmp_path / "k"), "--model", "mlp", "--val-data",
                                     str(tmp_path / "val.npz"), "--out", str(out), "--no-mdns",
                                     "--peer", "127.0.0.1:9"])
    assert r.exit_code != 0  # no key yet: one-line error
    CliRunner().invoke(hub_cli, ["keygen", str(tmp_path / "k")])
    r = CliRunner().invoke(hub_cli, ["train", "--key", str(tmp_path / "k"), "--model", "mlp", "--val-data",
                                     str(tmp_path / "val.npz"), "--out", str(out), "--no-mdns",
                                     "--peer", "127.0.0.1:9"])
    assert r.exit_code != 0 and r.output.startswith("ftte-hub: error: checkpoint") and "corrupt" in r.output


def test_budget_too_small_alone_waits_and_says_what_to_change(tmp_path):
    # issue 9 finding 4: a too-small agent no longer aborts the run at startup; it is not counted,
    # and giving up waiting says what to change
    val, parts = digits_split(2)

    async def main():
        tiny = FakeAgent(KEY, parts[0], "tiny", budget=1000)
        await tiny.start()
        try:
            await run_train(_cfg(tmp_path, val, [tiny.address], wait_timeout=3.0), KEY)
        finally:
            await tiny.close()

    with pytest.raises(TrainError, match=r"only 0 of 1 usable agents .*fake-tiny \(its memory budget 1,000 bytes "
                                         r"is below .* raise --memory-budget to at least [0-9]+KiB\)") as e:
        asyncio.run(main())
    assert "\n" not in str(e.value)


def test_finished_run_says_so_and_small_agent_gets_not_used(tmp_path, caplog):
    val, parts = digits_split(3)

    async def main():
        big = [FakeAgent(KEY, parts[i], f"big{i}") for i in range(2)]
        small = FakeAgent(KEY, parts[2], "small", budget=20_000)
        for a in big + [small]:
            await a.start()
        hooks = __import__("ftte_hub.fleet", fromlist=["Hooks"]).Hooks(
            on_ready=lambda fleet: fleet.add_address("127.0.0.1", small.port, "peer"))  # joins after the search
        cfg = _cfg(tmp_path, val, [a.address for a in big], min_agents=2, max_versions=4)
        try:
            return await run_train(cfg, KEY, hooks), small
        finally:
            for a in big + [small]:
                await a.close()

    summary, small = asyncio.run(main())
    assert summary["version"] == 4
    assert small.not_used is not None and small.not_used["budget_bytes"] == 20_000
    assert small.not_used["needed_bytes"] == summary["predicted_memory_bytes"] > 20_000
    assert small.tasks == 0 and summary["agents"]["small"]["not_used"]
    assert any("fake-small (small) not used" in r.getMessage() for r in caplog.records)
    with pytest.raises(TrainError, match="holds a finished run"):
        asyncio.run(run_train(_cfg(tmp_path, val, ["127.0.0.1:9"]), KEY))


def test_log_lines_text_and_json():
    import io
    import json
    import logging

    from ftte_hub.logs import event, log, setup_logging

    buf = io.StringIO()
    setup_logging("json", stream=buf)
    try:
        event("merge", "version 3 accuracy 0.5", fields={"version": 3, "accuracy": 0.5})
        event("agent_left", "agent x disconnected", logging.WARNING)
        lines = [json.loads(l) for l in buf.getvalue().splitlines()]
        assert lines[0]["event"] == "merge" and lines[0]["version"] == 3 and lines[0]["accuracy"] == 0.5
        assert lines[1] == {**lines[1], "event": "agent_left", "level": "warning", "message": "agent x disconnected"}
        buf2 = io.StringIO()
        setup_logging("text", stream=buf2)
        event("merge", "version 4", fields={"version": 4})
        assert buf2.getvalue().strip().endswith(" version 4") and buf2.getvalue().count("\n") == 1
    finally:
        for h in list(log.handlers):
            log.removeHandler(h)
        log.propagate = True


def test_fresh_run_in_a_folder_with_leftovers_starts_clean(tmp_path):
    from ftte_hub import checkpoint as ckpt

    val, parts = digits_split(1)
    out = tmp_path / "run"
    (out / "journal").mkdir(parents=True)
    j = ckpt.Journal(ckpt.journal_path(out, 0))
    j.write({"e": "task", "dev": "ghost", "tid": "t1"})
    j.close_now()
    (out / "metrics.jsonl").write_text('{"version": 7}\n')

    async def main():
        a = FakeAgent(KEY, parts[0], "a")
        await a.start()
        try:
            return await run_train(_cfg(tmp_path, val, [a.address], buffer=1, max_versions=2), KEY)
        finally:
            await a.close()

    summary = asyncio.run(main())
    versions = [__import__("json").loads(l)["version"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert versions == [1, 2] and summary["version"] == 2
    assert (out / "metrics.jsonl.old").read_text() == '{"version": 7}\n'
