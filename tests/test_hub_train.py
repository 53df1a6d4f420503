"""ftte-hub train against fake agents over loopback (--peer): a run, its outputs, bad peers."""
import asyncio
import json

import numpy as np
import pytest

from ftte_core import data as ftdata
from ftte_core.protocol import generate_key
from ftte_hub.train import TrainConfig, run_train

from test_hub_fakes import FakeAgent, digits_split

KEY = generate_key()


def _config(tmp_path, val, agents, **kw):
    val_path = tmp_path / "val.npz"
    ftdata.save_npz(val_path, val)
    base = dict(model="mlp", val_data=str(val_path), out=str(tmp_path / "run"), min_agents=len(agents),
                peers=[a.address for a in agents], mdns=False, buffer=3, max_versions=40, lr=0.1,
                batch_size=16, ping_interval=1.0, dead_after=10.0, wait_timeout=20.0)
    base.update(kw)
    return TrainConfig(**base)


async def _run(cfg, agents, key=KEY, timeout=60):
    try:
        return await asyncio.wait_for(run_train(cfg, key), timeout)
    finally:
        for a in agents:
            await a.close()


def test_three_agents_reach_target_and_export_matching_onnx(tmp_path):
    import onnxruntime as ort

    val, parts = digits_split(3)

    async def main():
        agents = [FakeAgent(KEY, parts[i], f"a{i}") for i in range(3)]
        for a in agents:
            await a.start()
        cfg = _config(tmp_path, val, agents, target_accuracy=0.85)
        return await _run(cfg, agents), agents

    summary, agents = asyncio.run(main())
    out = tmp_path / "run"
    assert summary["accuracy"] >= 0.85 and summary["reason"].startswith("reached --target-accuracy")
    assert all(a.stopped for a in agents) and all(a.model_downloads == 1 for a in agents)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["version"] for l in lines] == list(range(1, summary["version"] + 1))
    assert len(lines) == summary["merges"]
    for key in ("accuracy", "loss", "time_s", "agents_active", "mean_staleness", "bytes_in", "bytes_out",
                "merged_updates", "factors"):
        assert key in lines[0]
    sess = ort.InferenceSession(str(out / "model.onnx"))
    logits = sess.run(None, {sess.get_inputs()[0].name: val.x.astype(np.float32)})[0]
    assert abs(float(np.mean(logits.argmax(1) == val.y)) - summary["accuracy"]) < 1e-9
    saved = json.loads((out / "summary.json").read_text())
    assert saved["version"] == summary["version"]
    assert sum(a["accepted"] for a in saved["agents"].values()) == summary["accepted"]
    assert set(saved["agents"]) == {"a0", "a1", "a2"}


def test_bad_peers_are_rejected_and_the_run_completes(tmp_path, caplog):
    val, parts = digits_split(4)

    async def main():
        good = [FakeAgent(KEY, parts[i], f"good{i}") for i in range(3)]
        bad = [FakeAgent(KEY, parts[3], f"bad-{b}", behaviour=b)
               for b in ("garbage", "nan", "wrong_shape", "raw_garbage", "bad_info", "silent")]
        stranger = FakeAgent(generate_key(), parts[3], "stranger")
        agents = good + bad + [stranger]
        for a in agents:
            await a.start()
        cfg = _config(tmp_path, val, agents, min_agents=3, target_accuracy=0.9, task_timeout=0.3)
        return await _run(cfg, agents), {a.agent_id: a for a in agents}

    summary, agents = asyncio.run(main())
    assert summary["accuracy"] >= 0.9
    per = summary["agents"]
    for name in ("bad-garbage", "bad-nan", "bad-wrong_shape"):
        assert per[name]["accepted"] == 0 and per[name]["rejected"] >= 1, per[name]
        assert all(not a["accepted"] for a in agents[name].acks)
    assert summary["rejected_by_reason"].get("malformed", 0) >= 2
    assert summary["rejected_by_reason"].get("shape", 0) >= 1
    assert "stranger" not in per and agents["stranger"].tasks == 0   # wrong key: nothing trained
    assert "bad-raw_garbage" not in per and "bad-bad_info" not in per
    assert all(per[f"good{i}"]["accepted"] >= 1 for i in range(3))
    # the silent agent's task was given up after --task-timeout (its session ends; the loop re-dials)
    assert per["bad-silent"]["accepted"] == 0
    assert any("no UPDATE for task" in r.getMessage() and "bad-silent" in r.getMessage() for r in caplog.records)
    # one log line per bad peer event, naming it
    assert any("wrong key" in r.getMessage() for r in caplog.records)
