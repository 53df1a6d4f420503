"""Issue 14: two site hubs federate through Flower's deployment engine (docs/multi-site.md).

One SuperLink, two SuperNodes, each beside a site hub (`ftte-hub train --site`) with two
`ftte-agent` processes, all on loopback (--insecure: TLS and SuperNode authentication are what
the docs add for a real WAN). The bundled digits are split non-IID across the four agents; two
federation rounds (`flwr run examples/multisite`) must reach the target accuracy and the global
model must export to ONNX and match onnxruntime. Runs whenever flwr is installed; every process
it starts is in its own session and killed by group id at the end, whatever happened
(tests/multisite_support.py).
"""
import numpy as np
import pytest

pytest.importorskip("flwr", reason="the `flower` extra (flwr) is not installed")
pytest.importorskip("onnx", reason="the hub needs the onnx package")

from multisite_support import (Procs, federation_env, missing_tool, run_federation, start_superlink,  # noqa: E402
                               start_sites, start_supernodes)
from slowdev import scaled  # noqa: E402

pytestmark = pytest.mark.slow

TARGET = 0.80          # the sites' mean validation accuracy after two rounds (the start model: ~0.1)
SITE_VERSIONS = 4      # versions each site fleet trains per global model


def test_two_sites_federate_through_flower(tmp_path):
    why = missing_tool()
    if why:
        pytest.skip(why)
    d = tmp_path
    procs = Procs(d, federation_env(d))
    try:
        link = start_superlink(d, procs)
        val = start_sites(d, procs, scaled, SITE_VERSIONS)
        start_supernodes(d, procs, scaled, link)
        lines = run_federation(d, procs, scaled, rounds=2, site_versions=SITE_VERSIONS)
        assert [x["version"] for x in lines] == [1, 2]
        assert all(len(x["sites"]) == 2 for x in lines), lines
        assert lines[-1]["accuracy"] >= TARGET, lines
        # deltas only: up goes an int8 delta (a quarter of the float32 model, plus row scales and the subset)
        assert all(x["wan_train_up"] < 0.3 * 2 * x["full_model_float32"] for x in lines), lines
        # down goes the model once, then int8 steps of the rows that changed (the evaluate message
        # carries the new version; the next train message finds the site already holding it)
        assert lines[1]["wan_train_down"] < lines[0]["wan_train_down"] // 10, lines
        assert all(x["wan_eval_down"] < 0.3 * 2 * x["full_model_float32"] for x in lines), lines

        # the global model: ONNX out, the same logits in onnxruntime as in our engine
        import ftte_core as ft

        out = d / "federation" / "model.onnx"
        model = ft.load_model(str(out))
        assert model.evaluate(val.x, val.y)[1] >= TARGET - 0.05
        ort = pytest.importorskip("onnxruntime")
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        x = val.x[:64].astype(np.float32)
        theirs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(theirs, model.forward(x), rtol=1e-4, atol=1e-4)
    finally:
        procs.kill_all(scaled(10))
