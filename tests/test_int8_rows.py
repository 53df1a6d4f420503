"""Mixed weights (int8 frozen rows, float32 trained rows) of partly trained Dense / Conv2d layers
under frozen="int8": every kernel path against a float64 NumPy reference on the dequantised
weight, the fused SGD landing in the compact trained rows, finite differences, thread-count
independence, argument errors, scratch sizing, and the layer / Trainer / Subset / LocalWorker side."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from ftte_core.graph import quantize_rows

from test_conv import make, ref_backward, ref_forward
from test_int8 import _check_dx_by_differences, _threads, assert_all_equal, assert_scratch_as_sized


def _mixed(w, rows):
    """(q, scale, trained, row_slot, dequantised float64 weight) of w with `rows` trained."""
    rows = np.asarray(rows, np.int32)
    o = w.shape[0]
    frozen = np.setdiff1d(np.arange(o), rows)
    q, s = quantize_rows(w[frozen])
    slot = np.empty(o, np.int32)
    slot[rows] = np.arange(rows.size)
    slot[frozen] = ~np.arange(frozen.size)
    trained = np.ascontiguousarray(w[rows])
    deq = w.astype(np.float64)
    deq[frozen] = q.astype(np.float64) * s.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
    return q, s, trained, slot, deq


def _case(rng, x_shape, w_shape, rows, dy_shape):
    """Random x, a mixed weight of w_shape with `rows` trained (``_mixed``), random dy."""
    x = rng.standard_normal(x_shape).astype(np.float32)
    mixed = _mixed(rng.standard_normal(w_shape).astype(np.float32), rows)
    return x, mixed, rng.standard_normal(dy_shape).astype(np.float32)


def _kw(s, trained, slot):
    return {"w_scale": s, "w_trained": trained, "row_slot": slot}


# ---- dense ---------------------------------------------------------------------------------------
# (N, I, O, rows): the dot path (N <= 64, I >= 128), the blocked path, every row but one, one row
DENSE = [(5, 150, 37, [3, 10, 20, 36]), (70, 40, 23, [22, 0, 7]), (9, 20, 6, [0, 1, 2, 4, 5]), (3, 8, 5, [2])]


@pytest.mark.parametrize("N,I,O,rows", DENSE)
def test_dense_mixed_forward_dx_and_fused_sgd_match_numpy(N, I, O, rows):
    rng = np.random.default_rng(N + I)
    w = rng.standard_normal((O, I)).astype(np.float32)
    x = rng.standard_normal((N, I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    q, s, trained, slot, deq = _mixed(w, rows)
    rows = np.asarray(rows, np.int32)
    y = np.full((N, O), np.nan, np.float32)
    K.dense_forward(x, q, b, y, **_kw(s, trained, slot))
    np.testing.assert_allclose(y, x @ deq.T + b, rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    dx = np.full_like(x, np.nan)
    dw = np.empty((rows.size, I), np.float32)
    K.dense_backward(x, q, dy, rows, dw, None, dx, **_kw(s, trained, slot))
    np.testing.assert_allclose(dx, dy @ deq, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dy[:, rows].T @ x, rtol=1e-4, atol=1e-4)
    # fused SGD with momentum: dx from the weights before the update, the rows land in `trained`
    t, bb = trained.copy(), b.copy()
    vw, vb = np.full((rows.size, I), 0.5, np.float32), np.full(O, 0.25, np.float32)
    dx2 = np.full_like(x, np.nan)
    K.dense_backward_sgd(x, q, bb, dy, rows, dx2, True, vw, vb, 0.1, 0.9, 0.01, **_kw(s, t, slot))
    np.testing.assert_allclose(dx2, dy @ deq, rtol=1e-4, atol=1e-4)
    g = dy[:, rows].T.astype(np.float64) @ x + 0.01 * trained
    np.testing.assert_allclose(t, trained - 0.1 * (0.9 * 0.5 + g), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(vw, 0.9 * 0.5 + g, rtol=1e-4, atol=1e-4)
    gb = dy.sum(0).astype(np.float64) + 0.01 * b
    np.testing.assert_allclose(bb, b - 0.1 * (0.9 * 0.25 + gb), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(q, _mixed(w, rows)[0])  # frozen rows untouched


def test_dense_mixed_finite_differences():
    rng = np.random.default_rng(3)
    N, I, O = 4, 9, 6
    x = rng.standard_normal((N, I)).astype(np.float32)
    q, s, trained, slot, deq = _mixed(rng.standard_normal((O, I)).astype(np.float32), [4, 1])
    r = rng.standard_normal((N, O))
    dx = np.empty_like(x)
    K.dense_backward_sgd(x, q, None, r.astype(np.float32), np.array([4, 1], np.int32), dx, False, None, None,
                         1e-3, **_kw(s, trained, slot))
    _check_dx_by_differences(x, lambda x64: float(((x64 @ deq.T) * r).sum()), dx, rng, 10)


# ---- conv2d --------------------------------------------------------------------------------------
CONV = [
    ((2, 3, 7, 9, 5, 3, 3, (1, 1), (1, 1, 1, 1)), [1, 4]),
    ((3, 4, 11, 8, 5, 3, 3, (2, 2), (1, 0, 2, 1)), [0]),
    ((2, 5, 6, 7, 4, 1, 1, (1, 1), (0, 0, 0, 0)), [3, 2, 0]),  # pointwise
]


@pytest.mark.parametrize("ci", range(len(CONV)))
def test_conv2d_mixed_forward_dx_and_fused_sgd_match_numpy(ci):
    case, rows = CONV[ci]
    rng, x, w, b, yshape = make(case, 60 + ci)
    stride, pad = case[7], case[8]
    q, s, trained, slot, deq = _mixed(w, rows)
    rows = np.asarray(rows, np.int32)
    y = np.full(yshape, np.nan, np.float32)
    K.conv2d_forward(x, q, b, y, stride, pad, **_kw(s, trained, slot))
    np.testing.assert_allclose(y, ref_forward(x, deq, b, stride, pad), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(yshape).astype(np.float32)
    rdx, rdw, rdb = ref_backward(x, deq, dy, stride, pad)
    dx = np.full_like(x, np.nan)
    dw = np.empty((rows.size,) + w.shape[1:], np.float32)
    K.conv2d_backward(x, q, dy, rows, dw, None, dx, stride, pad, **_kw(s, trained, slot))
    np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, rdw[rows], rtol=1e-4, atol=1e-4)
    t, bb = trained.copy(), b.copy()
    dx2 = np.full_like(x, np.nan)
    K.conv2d_backward_sgd(x, q, bb, dy, rows, dx2, True, None, None, 0.05, 0.0, 0.0, stride, pad,
                          **_kw(s, t, slot))
    np.testing.assert_allclose(dx2, rdx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t, trained - 0.05 * rdw[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bb, b - 0.05 * rdb, rtol=1e-4, atol=1e-4)


def test_conv2d_mixed_finite_differences():
    case = (2, 3, 6, 5, 4, 3, 3, (2, 1), (1, 0, 0, 2))
    rng, x, w, b, yshape = make(case, 3)
    stride, pad = case[7], case[8]
    q, s, trained, slot, deq = _mixed(w, [2])
    r = rng.standard_normal(yshape)
    dx = np.empty_like(x)
    K.conv2d_backward(None, q, r.astype(np.float32), None, None, None, dx, stride, pad, **_kw(s, trained, slot))
    _check_dx_by_differences(x, lambda x64: float((ref_forward(x64, deq, None, stride, pad) * r).sum()), dx, rng, 8)


def test_mixed_kernels_give_identical_results_for_any_thread_count():
    rng = np.random.default_rng(5)
    rows_d, rows_c = np.arange(0, 130, 4, dtype=np.int32), np.array([5, 1, 9, 14], np.int32)
    xd, (qd, sd, td, pd, _), dyd = _case(rng, (70, 300), (130, 300), rows_d, (70, 130))
    xc, (qc, sc, tc, pc, _), dyc = _case(rng, (8, 8, 12, 12), (16, 8, 3, 3), rows_c, (8, 16, 12, 12))
    out = []
    for threads in (1, 2, 3):
        with _threads(threads):
            y, dx, y_dot = np.empty((70, 130), np.float32), np.empty_like(xd), np.empty((32, 130), np.float32)
            K.dense_forward(xd, qd, None, y, **_kw(sd, td, pd))
            K.dense_forward(xd[:32], qd, None, y_dot, **_kw(sd, td, pd))  # the dot path
            t = td.copy()
            K.dense_backward_sgd(xd, qd, None, dyd, rows_d, dx, False, None, None, 0.01, **_kw(sd, t, pd))
            yc, dxc, tcc = np.empty((8, 16, 12, 12), np.float32), np.empty_like(xc), tc.copy()
            K.conv2d_forward(xc, qc, None, yc, (1, 1), (1, 1, 1, 1), **_kw(sc, tc, pc))
            K.conv2d_backward_sgd(xc, qc, None, dyc, rows_c, dxc, False, None, None, 0.01, 0.0, 0.0, (1, 1),
                                  (1, 1, 1, 1), **_kw(sc, tcc, pc))
            out.append((y, dx, y_dot, t, yc, dxc, tcc))
    assert_all_equal(out)


def test_mixed_weight_argument_errors():
    x = np.ones((2, 4), np.float32)
    y = np.empty((2, 3), np.float32)
    q, s, t, slot, _ = _mixed(np.ones((3, 4), np.float32), [1])
    with pytest.raises(ValueError, match="^dense_forward: w_trained and row_slot must be given together"):
        K.dense_forward(x, q, None, y, w_scale=s, w_trained=t)
    with pytest.raises(ValueError, match="^dense_forward: w must have dtype int8 \\(the frozen rows\\)"):
        K.dense_forward(x, np.ones((2, 4), np.float32), None, y, **_kw(s, t, slot))
    with pytest.raises(ValueError, match="^dense_forward: w_trained has shape \\(1, 5\\) but dimension 1 must be 4"):
        K.dense_forward(x, q, None, y, **_kw(s, np.ones((1, 5), np.float32), slot))
    with pytest.raises(ValueError, match="^dense_forward: w_trained must have dtype float32"):
        K.dense_forward(x, q, None, y, **_kw(s, t.astype(np.float64), slot))
    with pytest.raises(ValueError, match="^dense_forward: w has 2 frozen and w_trained 1 trained rows, but row_slot has 4"):
        K.dense_forward(x, q, None, np.empty((2, 4), np.float32), **_kw(s, t, np.zeros(4, np.int32)))
    with pytest.raises(ValueError, match="^dense_forward: row_slot\\[0\\] = -3 names no row"):
        K.dense_forward(x, q, None, y, **_kw(s, t, np.array([-3, 0, -2], np.int32)))
    with pytest.raises(ValueError, match="^dense_forward: row_slot must have dtype int32"):
        K.dense_forward(x, q, None, y, **_kw(s, t, slot.astype(np.int64)))
    with pytest.raises(ValueError, match="^dense_forward: w is int8, so w_scale"):
        K.dense_forward(x, q, None, y, w_trained=t, row_slot=slot)
    dy = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="^dense_backward_sgd: a mixed weight needs rows"):
        K.dense_backward_sgd(x, q, None, dy, None, None, False, None, None, 0.1, **_kw(s, t, slot))
    with pytest.raises(ValueError, match="^dense_backward_sgd: row_slot\\[rows\\[0\\]\\] must be 0"):
        K.dense_backward_sgd(x, q, None, dy, np.array([0], np.int32), None, False, None, None, 0.1,
                             **_kw(s, t, slot))
    with pytest.raises(ValueError, match="^dense_backward_sgd: w_trained must be writable"):
        ro = t.copy()
        ro.flags.writeable = False
        K.dense_backward_sgd(x, q, None, dy, np.array([1], np.int32), None, False, None, None, 0.1,
                             **_kw(s, ro, slot))
    with pytest.raises(ValueError, match="^dense_backward_sgd: w_scale is for a mixed weight only"):
        K.dense_backward_sgd(x, np.ones((3, 4), np.float32), None, dy, None, None, False, None, None, 0.1, w_scale=s)
    with pytest.raises(ValueError, match="^dense_backward_sgd: dx must not share memory with w_trained|"
                                         "^dense_backward_sgd: w_trained must not share memory with dx"):
        both = np.zeros((2, 4), np.float32)
        K.dense_backward_sgd(x, q, None, dy, np.array([1], np.int32), both, False, None, None, 0.1,
                             **_kw(s, both[:1], slot))
    xc = np.ones((1, 2, 5, 5), np.float32)
    qc, sc, tc, pc, _ = _mixed(np.ones((3, 2, 3, 3), np.float32), [0, 2])
    with pytest.raises(ValueError, match="^conv2d_forward: w_trained has shape \\(2, 2, 3, 1\\) but dimension 3"):
        K.conv2d_forward(xc, qc, None, np.empty((1, 3, 3, 3), np.float32), **_kw(sc, tc[..., :1].copy(), pc))
    with pytest.raises(ValueError, match="^conv2d_backward_sgd: row_slot\\[rows\\[1\\]\\] must be 1"):
        K.conv2d_backward_sgd(xc, qc, None, np.ones((1, 3, 3, 3), np.float32), np.array([0, 1], np.int32), None,
                              False, None, None, 0.1, **_kw(sc, tc, pc))


def test_mixed_scratch_bytes_are_what_the_kernels_take():
    """The fused SGD's scratch with a mixed weight (dx packs it like an int8 one) is exact at one thread."""
    rng = np.random.default_rng(2)
    rows, rows_c = np.arange(0, 64, 4, dtype=np.int32), np.array([1, 4], np.int32)
    x, (q, s, t, slot, _), dy = _case(rng, (32, 300), (64, 300), rows, (32, 64))
    xc, (qc, sc, tc, pc, _), dyc = _case(rng, (4, 4, 9, 9), (6, 4, 3, 3), rows_c, (4, 6, 9, 9))
    calls = [
        (lambda: K.dense_forward(x, q, None, np.empty((32, 64), np.float32), **_kw(s, t, slot)),
         lambda: K.sgemm_scratch_bytes(32, 64, 300, False, True, int8_b=True)),
        (lambda: K.dense_backward_sgd(x, q, None, dy, rows, np.empty_like(x), False, None, None, 0.01,
                                      **_kw(s, t, slot)),
         lambda: K.dense_backward_sgd_scratch_bytes(32, 300, 64, rows.size, True, False, True, int8_weight=True)),
        (lambda: K.conv2d_backward_sgd(xc, qc, np.zeros(6, np.float32), dyc, rows_c, np.empty_like(xc), True, None,
                                       None, 0.01, 0.0, 0.0, (1, 1), (1, 1, 1, 1), **_kw(sc, tc, pc)),
         lambda: K.conv2d_backward_sgd_scratch_bytes(xc.shape, (6, 4, 3, 3), (1, 1), (1, 1, 1, 1), 2, True, True,
                                                     1, int8_weight=True)),
    ]
    assert_scratch_as_sized(calls)
    # dx reads a float32 weight in place (the small-batch plain B), a mixed one packs panels
    assert (K.dense_backward_sgd_scratch_bytes(32, 300, 64, 16, True, False, True, int8_weight=True)
            >= K.dense_backward_sgd_scratch_bytes(32, 300, 64, 16, True, False, True))


# ---- layers, Trainer, Subset, LocalWorker --------------------------------------------------------
def _mlp_and_subset():
    model = ft.zoo("mlp", (16,), 4, seed=0, hidden=(12,))
    l0, l1 = model.param_layers
    subset = ft.Subset.of(model, {l1.name: {"rows": "all", "bias": True}, l0.name: {"rows": [2, 7, 9], "bias": False}})
    return model, subset


def test_layer_mix_weight_holds_rows_and_dequantises_the_rest():
    model, subset = _mlp_and_subset()
    layer = model.param_layers[0]
    w = np.array(layer.weight)
    layer.mix_weight(np.array([2, 7, 9], np.int32))
    assert layer.is_mixed and not layer.is_int8 and layer._weight is None
    assert layer.weight_shape == (12, 16) and layer.weight_q.shape == (9, 16) and layer.weight_q.dtype == np.int8
    np.testing.assert_array_equal(layer.weight_trained, w[[2, 7, 9]])
    full = layer.weight
    assert not full.flags.writeable
    np.testing.assert_array_equal(full[[2, 7, 9]], w[[2, 7, 9]])
    assert np.abs(full - w).max() <= np.abs(w).max(axis=1).max() / 127  # int8 rounding of the others
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    deq = model.copy()
    deq.param_layers[0].weight = np.array(full)
    np.testing.assert_allclose(model.predict(x), deq.predict(x), rtol=1e-5, atol=1e-6)
    # the view the codec and the task values use is the compact float rows themselves
    (key, _l, view, rows), *_ = subset.tensors(model)
    assert key == f"{layer.name}.weight" and rows is None and np.shares_memory(view, layer.weight_trained)
    # another subset's rows read a dequantised copy (writing into it raises)
    other = ft.Subset.of(model, {layer.name: {"rows": [1], "bias": False}})
    (_k, _l, view, rows), = other.tensors(model)
    np.testing.assert_array_equal(view[rows], full[[1]])
    with pytest.raises(ValueError, match="read-only"):
        view[rows] = 0
    # load_state keeps it mixed over the same rows; quantize_weight makes all of it int8
    model.load_state({k: np.array(v) for k, v in model.state().items()})
    assert layer.is_mixed and list(layer.trained_rows) == [2, 7, 9]
    layer.quantize_weight()
    assert layer.is_int8 and layer.weight_trained is None
    with pytest.raises(ValueError, match="mixed rows must be unique"):
        model.param_layers[1].mix_weight(np.array([1, 1], np.int32))


def test_trainer_int8_mixes_partly_trained_layers_and_matches_the_dequantised_float_model():
    """A step on the mixed model equals a float32 step on the dequantised weights (same updates)."""
    model, subset = _mlp_and_subset()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    y = rng.integers(0, 4, 8).astype(np.int32)
    with _threads(1):
        m = model.copy()
        tr = ft.Trainer(m, subset, lr=0.1, momentum=0.5, frozen="int8")
        ref = m.copy()
        for layer in ref.param_layers:
            layer.weight = np.array(layer.weight)  # dequantised float32 copy of the converted model
        tr_ref = ft.Trainer(ref, subset, lr=0.1, momentum=0.5)
        for _ in range(3):
            tr.step(x, y)
            tr_ref.step(x, y)
        stepped = tr.memory.as_dict()
        # buffered gradients (Trainer.gradients) read the mixed weight too
        _, g = tr.gradients(x, y)
        _, g_ref = tr_ref.gradients(x, y)
    l0 = m.param_layers[0]
    assert l0.is_mixed and l0._weight is None
    np.testing.assert_allclose(m.param_layers[0].weight, ref.param_layers[0].weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.param_layers[1].weight, ref.param_layers[1].weight, rtol=1e-5, atol=1e-6)
    for k in g:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-6)
    want = ft.predict_memory(model, subset, batch_size=8, momentum=0.5, frozen="int8", threads=1)
    assert stepped == want  # at one thread, every category to the byte
    assert tr.memory.frozen_weights == want["frozen_weights"] == 9 * 16 + 9 * 4 + 12 * 4 + 12 * 4
    assert tr.memory.trainable_weights == want["trainable_weights"] == (3 * 16 + 4 * 12 + 4) * 4
    # a mixed layer trains other rows only with frozen="int8" (it is mixed again over them)
    other = ft.Subset.of(m, {l0.name: {"rows": [0, 1], "bias": False}})
    with pytest.raises(ValueError, match="holds int8 weights except for other rows"):
        ft.Trainer(m, other)
    ft.Trainer(m, other, frozen="int8")
    assert list(l0.trained_rows) == [0, 1]


def test_depthwise_layers_stay_float32_when_partly_trained():
    model = ft.zoo("dscnn", (1, 49, 10), 12, seed=0)
    dw = next(l for l in model.param_layers if getattr(l, "mode", "") == "depthwise")
    subset = ft.Subset.of(model, {dw.name: {"rows": [0], "bias": False},
                                  model.param_layers[-1].name: {"rows": "all", "bias": True}})
    ft.Trainer(model, subset, frozen="int8")
    assert not dw.is_mixed and not dw.is_int8


def test_local_worker_trains_mixed_layers_task_after_task():
    """The agent's path: task values land in the compact rows, the update is their delta."""
    from ftte_core.local import LocalWorker, TaskConfig
    from ftte_core.update import decode_update, subset_values
    model, subset = _mlp_and_subset()
    hub, worker, cfg = model.copy(), LocalWorker(model, subset), TaskConfig(batch_size=8, frozen="int8")
    x = np.random.default_rng(0).standard_normal((24, 16), dtype=np.float32)
    y = np.arange(24, dtype=np.int32) % 4
    with _threads(1):
        for _ in range(2):
            values = subset_values(hub, subset)
            result = worker.run(values, 0, x, y, cfg, bits=32)
            l0 = model.param_layers[0]
            assert l0.is_mixed and l0._weight is None
            np.testing.assert_array_equal(np.asarray(l0.trained_rows), [2, 7, 9])
            delta = decode_update(result.update)
            key = f"{l0.name}.weight"
            np.testing.assert_allclose(values[key] + delta[key], l0.weight_trained, rtol=1e-6, atol=1e-6)
            for k, d in delta.items():  # the hub merges the delta (a plain FedAvg of one update)
                hub_view = [v for kk, _l, v, r in subset.tensors(hub) if kk == k][0]
                rows = [r for kk, _l, v, r in subset.tensors(hub) if kk == k][0]
                if rows is None:
                    hub_view += d
                else:
                    hub_view[rows] += d
    want = ft.predict_memory(model, subset, batch_size=8, frozen="int8", threads=1)
    assert result.memory.frozen_weights == want["frozen_weights"]
    assert result.memory.trainable_weights == want["trainable_weights"]


def test_conv1d_cnn_mixed_step_matches_the_dequantised_float_model_and_saves_float32():
    """A Conv1d (2-D kernels through reshapes) and a Conv2d-based CNN partly trained under
    frozen="int8": same step as float32 on the dequantised weights, memory as predicted, and the
    model file holds the dequantised float32 weights (loading gives float32 layers)."""
    from ftte_core import graph as G
    from ftte_core.modelfile import model_from_bytes, model_to_bytes
    rng = np.random.default_rng(4)
    c1 = G.Conv1d("c1", rng.standard_normal((6, 2, 3)).astype(np.float32) * 0.3, None, (1,), (1, 1))
    fc = G.Dense("fc", rng.standard_normal((3, 6 * 8)).astype(np.float32) * 0.2)
    model = G.Model([c1, G.ReLU("r"), G.Flatten("f"), fc], (2, 8), name="c1d")
    cnn = ft.zoo("cnn", (1, 8, 8), 4, seed=2, channels=(3, 5))
    for m0, x_shape in ((model, (6, 2, 8)), (cnn, (6, 1, 8, 8))):
        names = [layer.name for layer in m0.param_layers]
        first = [layer for layer in m0.param_layers if layer.kind in ("conv1d", "conv2d")][-1].name
        subset = ft.Subset.of(m0, {names[-1]: {"rows": "all", "bias": True}, first: {"rows": [1, 4], "bias": True}})
        x = rng.standard_normal(x_shape).astype(np.float32)
        y = rng.integers(0, m0.num_classes, x_shape[0]).astype(np.int32)
        with _threads(1):
            m = m0.copy()
            tr = ft.Trainer(m, subset, lr=0.05, frozen="int8")
            assert m.layer(first).is_mixed
            ref = m.copy()
            for layer in ref.param_layers:
                layer.weight = np.array(layer.weight)
            tr_ref = ft.Trainer(ref, subset, lr=0.05)
            for _ in range(2):
                tr.step(x, y)
                tr_ref.step(x, y)
        np.testing.assert_allclose(m.layer(first).weight, ref.layer(first).weight, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m.predict(x), ref.predict(x), rtol=1e-4, atol=1e-5)
        want = ft.predict_memory(m0, subset, batch_size=6, frozen="int8", threads=1)
        assert tr.memory.as_dict() == want  # every category, kernel scratch included, to the byte
        back = model_from_bytes(model_to_bytes(m))
        assert not back.layer(first).is_mixed
        np.testing.assert_array_equal(back.layer(first).weight, m.layer(first).weight)
        np.testing.assert_allclose(back.predict(x), m.predict(x), rtol=1e-5, atol=1e-6)


def test_run_task_on_one_model_copy_across_subsets_re_mixes_the_layer():
    """A device model reused for tasks of different subsets (tiered strategies, the simulator):
    a layer mixed over one subset's rows takes the next subset's rows as float32."""
    from ftte_core.local import LocalWorker, TaskConfig
    from ftte_core.update import subset_values
    model, subset = _mlp_and_subset()
    l0 = model.param_layers[0]
    other = ft.Subset.of(model, {model.param_layers[1].name: {"rows": "all", "bias": True},
                                 l0.name: {"rows": [0, 2, 5, 11], "bias": False}})
    hub = model.copy()
    x = np.random.default_rng(1).standard_normal((16, 16), dtype=np.float32)
    y = np.arange(16, dtype=np.int32) % 4
    with _threads(1):
        for sub, rows in ((subset, [2, 7, 9]), (other, [0, 2, 5, 11]), (subset, [2, 7, 9])):
            values = subset_values(hub, sub)
            LocalWorker(model, sub).run(values, 0, x, y, TaskConfig(batch_size=8, frozen="int8"))
            assert l0.is_mixed and list(l0.trained_rows) == rows
            assert l0.weight_trained.shape == (len(rows), 16)
