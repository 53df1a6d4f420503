"""The flwr-free halves of the multi-site bridge (issue 14): the global model's downlink, the site
channel's framing, and the federation's robust merge of site deltas (federation.py). Light: no
processes, no Flower (tests/test_multisite.py runs the whole thing)."""
import ast
from pathlib import Path

import numpy as np
import pytest

import ftte_core as ft
from ftte_core.robust import RobustPolicy
from ftte_core.subset import Subset
from ftte_core.update import encode_update, subset_values
from ftte_hub.federation import Federation
from ftte_hub.site import SiteError, apply_downlink, downlink_arrays, pack, unpack

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed=0):
    return ft.zoo("mlp", (8,), 3, seed=seed, hidden=(6,))


def site_update(model, subset, delta, version=0, samples=10):
    """What a site sends: its trained model's int8 delta on its subset, against ``model``."""
    trained = model.copy()
    for key, _l, view, rows in subset.tensors(trained):
        if rows is None:
            view += delta
        else:
            view[rows] += delta
    up = encode_update(trained, subset, subset_values(model, subset), version, num_samples=samples, loss=0.0,
                       bits=8, stochastic=False)
    return up.to_bytes()


def test_downlink_whole_then_changed_rows():
    m = tiny()
    whole = downlink_arrays(m, None)
    assert set(whole) == {"model"}
    got = apply_downlink(whole, None)
    assert all(np.array_equal(got.state()[k], v) for k, v in m.state().items())
    base = {k: v.copy() for k, v in m.state().items()}
    m.state()["fc1.weight"][2] += 1.0
    m.state()["fc2.bias"][0] -= 0.5
    rows = downlink_arrays(m, base)
    assert sorted(rows) == ["rows:fc1.weight", "rows:fc2.bias", "vals:fc1.weight", "vals:fc2.bias"]
    assert rows["rows:fc1.weight"].tolist() == [2]
    again = apply_downlink(rows, got)
    assert all(np.array_equal(again.state()[k], v) for k, v in m.state().items())
    with pytest.raises(SiteError) as e:
        apply_downlink(rows, None)
    assert e.value.need_full
    bad = dict(rows, **{"rows:fc1.weight": np.array([99], np.int32)})
    with pytest.raises(SiteError, match="does not fit"):
        apply_downlink(bad, got)


def test_site_frames_round_trip_and_refuse_garbage():
    head, arrays = unpack(pack({"version": 3}, {"a": np.arange(4, dtype=np.int32)}))
    assert head == {"version": 3} and arrays["a"].tolist() == [0, 1, 2, 3]
    for junk in (b"", b"\xff\xff\xff\x7f{}", pack({"v": 1})[:-3]):
        with pytest.raises(SiteError, match="malformed"):
            unpack(junk)


def test_sites_with_one_subset_merge_as_the_hub_weighs_them(tmp_path):
    m = tiny()
    fed = Federation(str(tmp_path), m.copy(), strategy="fedavg")
    full = Subset.full(m)
    a = fed.check("a", 0, 30, site_update(m, full, 0.1), full.to_dict())
    b = fed.check("b", 0, 10, site_update(m, full, -0.1), full.to_dict())
    before = m.state()["fc1.weight"].copy()
    line = fed.merge([a, b])
    assert fed.version == 1 and line["weights"] == pytest.approx([0.75, 0.25])
    # fedavg: 0.75 * 0.1 + 0.25 * -0.1 = 0.05 (int8 rounding of a constant row is exact)
    np.testing.assert_allclose(fed.model.state()["fc1.weight"], before + 0.05, atol=1e-6)


def test_rows_trained_by_one_site_move_by_that_site_alone(tmp_path):
    m = tiny()
    fed = Federation(str(tmp_path), m.copy(), strategy="fedavg")
    sa = Subset.of(m, {"fc1": {"rows": [0, 1], "bias": False}})
    sb = Subset.of(m, {"fc1": {"rows": [1, 2], "bias": False}})
    line = fed.merge([fed.check("a", 0, 10, site_update(m, sa, 0.2), sa.to_dict()),
                      fed.check("b", 0, 10, site_update(m, sb, -0.2), sb.to_dict())])
    w = fed.model.state()["fc1.weight"] - m.state()["fc1.weight"]
    np.testing.assert_allclose(w[0], 0.2, atol=1e-6)     # only a trained row 0
    np.testing.assert_allclose(w[1], 0.0, atol=1e-6)     # both: their mean
    np.testing.assert_allclose(w[2], -0.2, atol=1e-6)    # only b
    np.testing.assert_allclose(w[3:], 0.0)               # nobody
    assert line["version"] == 1


def test_bad_sites_are_refused_or_bounded(tmp_path):
    m = tiny()
    fed = Federation(str(tmp_path), m.copy(), robust=RobustPolicy(clip_multiple=2.0, max_abs_delta=50.0))
    full = Subset.full(m)
    with pytest.raises(ValueError, match="max_abs_delta"):
        fed.check("huge", 0, 10, site_update(m, full, 100.0), full.to_dict())
    with pytest.raises(ValueError, match="base version"):
        fed.check("future", 5, 10, site_update(m, full, 0.1), full.to_dict())
    with pytest.raises(ValueError, match="malformed"):
        fed.check("junk", 0, 10, b"FTUP junk", full.to_dict())
    for _ in range(3):   # a history of small norms, then one site 20x larger is clipped to 2x the median
        fed.merge([fed.check("ok", fed.version, 10, site_update(fed.model, full, 0.01, fed.version), full.to_dict())])
    line = fed.merge([fed.check("big", fed.version, 10, site_update(fed.model, full, 0.2, fed.version),
                                full.to_dict())])
    assert line["clip"][0] == pytest.approx(0.1, rel=0.05)
    # a stale site counts less (FTTE's age factor) than a fresh one with the same data
    stale = fed.check("old", fed.version - 2, 10, site_update(m, full, 0.01), full.to_dict())
    fresh = fed.check("new", fed.version, 10, site_update(fed.model, full, 0.01, fed.version), full.to_dict())
    line = fed.merge([stale, fresh])
    assert line["staleness"] == [2, 0] and line["weights"][0] < line["weights"][1]


def test_federation_checkpoints_exports_and_resumes(tmp_path):
    pytest.importorskip("onnx")
    fed = Federation.open(str(tmp_path), "mlp", (1, 8, 8), 10, seed=0)
    full = Subset.full(fed.model)
    fed.merge([fed.check("a", 0, 10, site_update(fed.model, full, 0.01), full.to_dict())])
    fed.save({"version": fed.version})
    again = Federation.open(str(tmp_path), "mlp", (1, 8, 8), 10)
    assert again.version == 1 and len(again.norms) == 1
    assert all(np.array_equal(again.model.state()[k], v) for k, v in fed.model.state().items())
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_only_the_bridge_imports_flower():
    """The agent and the hub never load flwr; nothing imports the bridge (it is named by the Flower app)."""
    for folder in ("src/ftte_core", "agent/ftte_agent", "hub/ftte_hub"):
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text()
            if "flwr" not in text and "flower_bridge" not in text:
                continue   # cheap: parse only the files that could import either
            tree = ast.parse(text)
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            if path.name != "flower_bridge.py":
                assert not any(x == "flwr" or x.startswith("flwr.") for x in names), path
                assert not any("flower_bridge" in x for x in names), path


def test_site_socket_serves_the_key_holder_only(tmp_path):
    """The local channel: a global model (whole, then changed rows) is evaluated on the site's data
    for a client with the fleet key; without the key, or for a version it lacks, a one-line refusal."""
    import asyncio
    import threading

    from ftte_core import data as ftdata
    from ftte_core.protocol import generate_key
    from ftte_hub.site import SITE_EVALUATE, Site, request
    from ftte_hub.train import TrainConfig

    ds = ftdata.load_bundled("digits")
    val = ftdata.Dataset(ds.x[:60], ds.y[:60], ds.num_classes)
    ftdata.save_npz(tmp_path / "val.npz", val)
    key, sock = generate_key(), str(tmp_path / "site.sock")
    site = Site(TrainConfig(model=None, val_data=str(tmp_path / "val.npz"), out=str(tmp_path / "site")), key)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_unix_server(site.serve, path=sock), loop).result(30)
    try:
        m = ft.zoo("mlp", (1, 8, 8), 10, seed=0, hidden=(16,))
        head, _ = request(sock, key, SITE_EVALUATE, {"federation": "f", "version": 0}, downlink_arrays(m, None), 30)
        assert head["samples"] == 60 and head["accuracy"] == pytest.approx(m.evaluate(val.x, val.y)[1])
        m2 = m.copy()
        m2.state()["fc1.weight"][:4] += 0.5
        head, _ = request(sock, key, SITE_EVALUATE, {"federation": "f", "version": 1, "base_version": 0},
                          downlink_arrays(m2, m.state()), 30)
        assert head["accuracy"] == pytest.approx(m2.evaluate(val.x, val.y)[1])
        with pytest.raises(SiteError) as e:
            request(sock, key, SITE_EVALUATE, {"federation": "f", "version": 3, "base_version": 2},
                    downlink_arrays(m2, m.state()), 30)
        assert e.value.need_full
        with pytest.raises(SiteError, match="site hub at"):
            request(sock, generate_key(), SITE_EVALUATE, {"federation": "f", "version": 0},
                    downlink_arrays(m, None), 30)
    finally:
        async def shut():  # on the server's own loop: Server.close from another thread races it
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_sites_follow_the_versions_by_int8_steps_bit_for_bit(tmp_path):
    """Down goes an int8 step per version; a site applying them holds exactly the ServerApp's copy,
    which stays within half a quantisation step of the merged model (the error does not pile up)."""
    m = tiny()
    fed = Federation(str(tmp_path), m.copy(), strategy="fedavg")
    site = apply_downlink(fed.downlink(None), None)
    rng = np.random.default_rng(0)
    for v in range(1, 6):
        sub = Subset.of(fed.model, {"fc1": {"rows": [int(rng.integers(6))], "bias": True}})
        delta = float(rng.normal(0, 0.3))
        fed.merge([fed.check("a", v - 1, 10, site_update(site, sub, delta, v - 1), sub.to_dict())])
        arrays = fed.downlink(v - 1)
        assert any(k.startswith("q:") for k in arrays) and all(a.dtype != np.float32 or k.startswith("s:")
                                                                 for k, a in arrays.items())
        site = apply_downlink(arrays, site)
        for key, held in fed.params_of(v).items():
            assert np.array_equal(site.state()[key], held), (v, key)
            rows_true = fed.model.state()[key].reshape(held.shape[0], -1) if held.ndim > 1 \
                else fed.model.state()[key].reshape(1, -1)
            rows_held = held.reshape(rows_true.shape)
            gap = np.max(np.abs(rows_true.astype(np.float64) - rows_held), axis=1)
            span = np.max(np.abs(rows_true), axis=1) + 1e-6
            assert np.all(gap <= span / 127 + 1e-6), (v, key)
    assert fed.downlink(fed.version) == {}
    older = fed.downlink(2)   # a site two or more versions behind gets float32 rows of the held copy
    assert any(k.startswith("vals:") for k in older)
    behind = fed.model.copy()
    behind.load_state(fed.params_of(2))
    caught_up = apply_downlink(older, behind)
    assert all(np.array_equal(caught_up.state()[k], v) for k, v in fed.params_of(fed.version).items())


def test_site_messages_that_would_inflate_are_refused():
    import io
    import struct

    head, arrays = unpack(pack({"a": 1}, {"x": np.arange(6, dtype=np.float32)}))
    assert head == {"a": 1} and arrays["x"].tolist() == list(range(6))
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros(8 << 20, np.uint8))   # 8 MiB of zeros in a few KiB
    head = b"{}"
    with pytest.raises(SiteError, match="expand past"):
        unpack(struct.pack("<I", len(head)) + head + buf.getvalue())
