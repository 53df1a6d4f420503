"""The ServerApp's rounds against a fake Grid (no SuperLink): a slow site is not waited for once
``buffer`` sites have answered, and its late delta is merged in the next round with its staleness.
Needs flwr (the `flower` extra); tests/test_multisite.py runs the real deployment engine."""
import itertools
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr", reason="the `flower` extra (flwr) is not installed")
pytest.importorskip("onnx", reason="the ServerApp writes ONNX")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from ftte_core.subset import Subset  # noqa: E402
from ftte_core.update import encode_update, subset_values  # noqa: E402
from ftte_hub import flower_bridge as fb  # noqa: E402
from ftte_hub.site import apply_downlink  # noqa: E402


class FakeGrid:
    """Sites answer in-process: train -> a small delta on fc3, evaluate -> a fixed accuracy.
    ``slow`` sites' train replies become visible only after ``delay`` pulls."""

    def __init__(self, nodes, slow=(), delay=3):
        self.run = SimpleNamespace(run_id=7)
        self.nodes, self.slow, self.delay = list(nodes), set(slow), delay
        self.held = {}            # node -> {version: model}
        self.waiting = {}         # message id -> [reply, pulls left]
        self.ids = itertools.count()

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, msgs):
        out = []
        for m in msgs:
            mid = f"m{next(self.ids)}"
            node = m.metadata.dst_node_id
            pulls = self.delay if m.metadata.message_type == "train" and node in self.slow else 0
            self.waiting[mid] = [self.answer(mid, node, m), pulls]
            out.append(mid)
        return out

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            entry = self.waiting.get(mid)
            if entry is None:
                continue
            if entry[1] <= 0:
                out.append(self.waiting.pop(mid)[0])
            else:
                entry[1] -= 1
        return out

    def answer(self, mid, node, m):
        cfg = m.content["config"]
        held = self.held.setdefault(node, {})
        arrays = {k: a.numpy() for k, a in m.content["global"].items()}
        model = apply_downlink(arrays, held.get(cfg["base-version"]))
        held[cfg["version"]] = model
        meta = SimpleNamespace(reply_to_message_id=mid, src_node_id=node)
        if m.metadata.message_type == "evaluate":
            content = RecordDict({"metrics": MetricRecord({"version": cfg["version"], "accuracy": 0.5, "samples": 10})})
        else:
            subset = Subset.of(model, {"fc3": {"rows": "all", "bias": True}})
            trained = model.copy()
            trained.state()["fc3.weight"][...] += 0.01
            up = encode_update(trained, subset, subset_values(model, subset), cfg["version"], num_samples=20,
                               loss=0.0, bits=8, stochastic=False)
            import numpy as np

            content = RecordDict({
                "metrics": MetricRecord({"version": cfg["version"], "samples": 20, "accuracy": 0.5}),
                "update": ArrayRecord({"update": Array(np.frombuffer(up.to_bytes(), dtype=np.uint8))}),
                "site": ConfigRecord({"subset": json.dumps(subset.to_dict())})})
        return SimpleNamespace(metadata=meta, content=content, has_error=lambda: False)


def test_a_late_site_is_merged_next_round_with_its_staleness(tmp_path, monkeypatch):
    monkeypatch.setattr(fb.time, "sleep", lambda s: None)
    # what a ServerApp process gets from flwr-serverapp before it runs (Message() reads it)
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)
    grid = FakeGrid([1, 2, 3], slow=[3], delay=1)   # ready at the first pull of the next round
    ctx = SimpleNamespace(run_config={"out": str(tmp_path / "fed"), "model": "mlp", "input-shape": "1x8x8",
                                      "num-classes": 10, "num-rounds": 3, "site-versions": 2, "min-sites": 3,
                                      "buffer": 2, "round-timeout": 60.0, "evaluate-timeout": 60.0})
    fb.federate(grid, ctx)
    lines = [json.loads(x) for x in (tmp_path / "fed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == [1, 2, 3]
    assert lines[0]["sites"] == ["1", "2"] and lines[0]["staleness"] == [0, 0]
    late = [x for x in lines if "3" in x["sites"]]
    assert late and late[0]["staleness"][late[0]["sites"].index("3")] >= 1
    w = late[0]["weights"]
    assert w[late[0]["sites"].index("3")] < max(w)          # FTTE's age factor: the stale site counts less
    assert all(x["accuracy"] == pytest.approx(0.5) for x in lines)
    assert lines[1]["wan_train_down"] < lines[0]["wan_train_down"] // 10   # rows, not the model
    assert (tmp_path / "fed" / "model.onnx").exists()
