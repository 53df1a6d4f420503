"""`ftte-hub train` with DAG models: the model file carries the DAG to the agents, they train it,
the hub merges, and the subset is named by the layers' (ONNX) names.

In-process with fake agents (quick), then real agent processes (slow) for an ONNX DAG file and
for the zoo's resnet8, each skipped with a reason on a branch that lacks the importer or the
zoo model.
"""
import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

import ftte_core as ft
from ftte_core import data as ftdata
from ftte_core import modelfile
from ftte_core.protocol import generate_key, write_key
from ftte_core.zoo import zoo_names
from ftte_hub import train as hub_train
from ftte_hub.train import TrainConfig, run_train

import dag_models
from slowdev import flag, scaled
from test_hub_fakes import FakeAgent, digits_split

pytest.importorskip("onnx", reason="the hub reads and writes ONNX (no onnx wheels for 32-bit ARM)")

KEY = generate_key()


def _export_or_model_file(monkeypatch):
    """Until ONNX export of DAGs lands (branch wip-onnx), the run's final model.onnx is written as
    a model file instead, so the rest of the run is still tested here."""
    if dag_models.onnx_dag_export_works():
        return False
    monkeypatch.setattr(ft, "save_onnx", lambda model, path, opset=13: open(path, "wb").write(
        modelfile.model_to_bytes(model)))
    return True


@pytest.mark.slow  # a whole hub run: skipped only under emulation (pi-check)
def test_hub_trains_a_residual_dag_with_fake_agents(tmp_path, monkeypatch, caplog):
    val, parts = digits_split(3)
    start = dag_models.tiny_resnet((1, 8, 8), 10, seed=0)
    monkeypatch.setattr(hub_train, "build_model", lambda spec, val, seed=0, options=None: start.copy())
    as_model_file = _export_or_model_file(monkeypatch)
    val_path = tmp_path / "val.npz"
    ftdata.save_npz(val_path, val)

    async def main():
        agents = [FakeAgent(KEY, parts[i], f"a{i}", budget=600 << 10) for i in range(3)]
        for a in agents:
            await a.start()
        cfg = TrainConfig(model="tiny_resnet.onnx", val_data=str(val_path), out=str(tmp_path / "run"),
                          min_agents=3, peers=[a.address for a in agents], mdns=False, buffer=2, max_versions=4,
                          lr=0.05, batch_size=16, ping_interval=1.0, dead_after=scaled(10.0),
                          wait_timeout=scaled(20.0))
        try:
            return await asyncio.wait_for(run_train(cfg, KEY), scaled(300)), agents
        finally:
            for a in agents:
                await a.close()

    with caplog.at_level("INFO"):
        summary, agents = asyncio.run(main())
    assert summary["version"] == 4
    # every agent got the DAG once, as a version-2 model file, and trained it
    for a in agents:
        assert a.model_downloads == 1 and a.tasks > 0
        (shipped,) = a.models.values()
        assert shipped.inputs == start.inputs and [l.kind for l in shipped.layers] == [l.kind for l in start.layers]
    assert (tmp_path / "run" / "initial-model.ftmd").read_bytes()[4:6] == (2).to_bytes(2, "little")
    # the subset line names layers as the ONNX file does ("block_conv2_Conv", "fc_Gemm", ...)
    subset_lines = [r.getMessage() for r in caplog.records if "subset for M_min" in r.getMessage()]
    assert subset_lines, [r.getMessage() for r in caplog.records][-10:]
    named = [l.name for l in start.layers if l.has_params]
    assert any(name + ":" in subset_lines[0] for name in named), subset_lines[0]
    out = tmp_path / "run" / "model.onnx"
    trained = modelfile.model_from_bytes(out.read_bytes()) if as_model_file else ft.load_model(out)
    changed = [k for k, v in trained.state().items() if not np.array_equal(v, start.state()[k])]
    assert changed, "nothing trained"


# -- real agent processes ----------------------------------------------------------------------------
def _fleet(tmp_path, shape, per_agent=64, n_val=80):
    """Key, validation file and 3 agent processes whose data is the digits resampled to ``shape``."""
    from test_agent import AgentProc
    key = tmp_path / "fleet.key"
    write_key(key, generate_key())
    train, val = ftdata.train_val_split(ftdata.load_bundled("digits"), 0.2, seed=0)
    val = ftdata.resample_to_shape(val.subset(np.arange(n_val)), shape)[0]
    ftdata.save_npz(tmp_path / "val.npz", val)
    agents = []
    parts = ftdata.partition_dirichlet(train, 3, alpha=1.0, seed=0, min_size=per_agent)
    for i, part in enumerate(parts):
        part = ftdata.resample_to_shape(part.subset(np.arange(per_agent)), shape)[0]
        ftdata.save_npz(tmp_path / f"d{i}.npz", part)
        cmd = [sys.executable, "-m", "ftte_agent.cli", "--key", str(key), "--data", str(tmp_path / f"d{i}.npz"),
               "--state-dir", str(tmp_path / f"agent{i}"), "--name", f"dev{i}", "--port", "0",
               "--interface", "127.0.0.1", "--no-mdns", "--memory-budget", "64MiB"]
        agents.append(AgentProc(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    return key, agents


def _run_hub(tmp_path, key, agents, model, max_versions=3):
    from test_agent_fleet import HubProc
    out = tmp_path / "out"
    args = ["--key", str(key), "--model", model, "--val-data", str(tmp_path / "val.npz"), "--out", str(out),
            "--min-agents", "3", "--buffer", "2", "--max-versions", str(max_versions), "--no-mdns",
            "--task-timeout", flag(60), "--wait-timeout", flag(30), "--batch-size", "16", "--local-epochs", "1"]
    for a in agents:
        args += ["--peer", f"127.0.0.1:{a.port}"]
    hub = HubProc(args)
    status = hub.finish()
    return hub, status, out


HUB_WITH_MODEL = """
import sys
import ftte_core as ft
from ftte_core import modelfile
from ftte_hub import train

blob = open(sys.argv[1], "rb").read()
train.build_model = lambda spec, val, seed=0, options=None: modelfile.model_from_bytes(blob)
try:
    ft.to_onnx(modelfile.model_from_bytes(blob))
except ValueError:  # no ONNX export of DAGs on this branch yet (wip-onnx): write the model file instead
    ft.save_onnx = lambda model, path, opset=13: open(path, "wb").write(modelfile.model_to_bytes(model))
sys.argv = ["ftte-hub", "train"] + sys.argv[2:]
from ftte_hub.cli import main
main()
"""


@pytest.mark.slow
def test_real_agents_train_a_dag_the_hub_ships(tmp_path, monkeypatch):
    """The hub process (its model loader swapped for a model file, so that no ONNX importer is
    needed) ships a DAG to real agent processes, which train it through to the last version."""
    import test_agent_fleet
    start = dag_models.tiny_resnet((3, 12, 12), 10, seed=0)
    script, blob = tmp_path / "hub_with_model.py", tmp_path / "start.ftmd"
    script.write_text(HUB_WITH_MODEL)
    blob.write_bytes(modelfile.model_to_bytes(start))
    monkeypatch.setattr(test_agent_fleet, "HUB", [sys.executable, str(script), str(blob)])
    key, agents = _fleet(tmp_path, (3, 12, 12))
    try:
        hub, status, out = _run_hub(tmp_path, key, agents, "tiny_resnet.onnx")
    finally:
        for a in agents:
            a.stop()
    assert status == 0, "\n".join(hub.lines[-30:])
    assert json.loads((out / "summary.json").read_text())["version"] == 3
    assert not [ln for ln in hub.lines if "Traceback" in ln]
    for a in agents:
        assert not [ln for ln in a.lines if "Traceback" in ln or "failed" in ln.lower()], a.lines[-10:]
    (line,) = [ln for ln in hub.lines if "subset for M_min" in ln]
    assert any(l.name + ":" in line for l in start.layers if l.has_params), line


@pytest.mark.slow
def test_real_agents_train_an_onnx_dag_file(tmp_path):
    ok, why = dag_models.onnx_dag_import_works()
    if not ok:
        pytest.skip(why)
    start = dag_models.tiny_resnet((3, 12, 12), 10, seed=0)
    path = tmp_path / "tiny_resnet.onnx"
    path.write_bytes(dag_models.to_onnx_bytes(start))
    key, agents = _fleet(tmp_path, (3, 12, 12))
    try:
        hub, status, out = _run_hub(tmp_path, key, agents, str(path))
    finally:
        for a in agents:
            a.stop()
    assert status == 0, "\n".join(hub.lines[-30:])
    assert json.loads((out / "summary.json").read_text())["version"] == 3
    (line,) = [ln for ln in hub.lines if "subset for M_min" in ln]
    assert any(l.name + ":" in line for l in start.layers if l.has_params), line
    assert not [ln for ln in hub.lines if "Traceback" in ln]
    trained = ft.load_model(out / "model.onnx")
    assert trained.inputs == start.inputs


@pytest.mark.slow
def test_real_agents_train_zoo_resnet8(tmp_path):
    if "resnet8" not in zoo_names():
        pytest.skip("zoo model 'resnet8' is not in this build's zoo (branch wip-zoo adds it)")
    from ftte_hub.simulate import REFERENCE_SHAPES
    key, agents = _fleet(tmp_path, REFERENCE_SHAPES["resnet8"], per_agent=32, n_val=48)
    try:
        hub, status, out = _run_hub(tmp_path, key, agents, "resnet8", max_versions=2)
    finally:
        for a in agents:
            a.stop()
    assert status == 0, "\n".join(hub.lines[-30:])
    assert json.loads((out / "summary.json").read_text())["version"] == 2
    assert not [ln for ln in hub.lines if "Traceback" in ln]
