"""Micro-batched steps (``Trainer(micro_batch=m)``): the same SGD step in passes of m samples,
with activations and workspace for m samples, predicted to the byte."""
import numpy as np
import pytest

import ftte_core as ft
from ftte_core import _kernels as K
from test_fused_sgd import _models, _subset


def _batch(model, n, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    return x, rng.integers(0, 10, n).astype(np.int32)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "separable"])
@pytest.mark.parametrize("which", ["full", "sparse", "rows"])
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-3)])
@pytest.mark.parametrize("n,m", [(16, 4), (15, 4), (6, 8)])
def test_micro_batched_step_is_the_one_pass_step(name, which, momentum, wd, n, m):
    base = _models()[name]
    subset = _subset(base, which)
    x, y = _batch(base, n)
    one, micro = base.copy(), base.copy()
    tr_one = ft.Trainer(one, subset, lr=0.05, momentum=momentum, weight_decay=wd)
    tr_micro = ft.Trainer(micro, subset, lr=0.05, momentum=momentum, weight_decay=wd, micro_batch=m)
    assert not tr_micro.fused
    losses = [tr_one.step(x, y) for _ in range(3)]
    micro_losses = [tr_micro.step(x, y) for _ in range(3)]
    np.testing.assert_allclose(micro_losses, losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(micro.param_layers, one.param_layers):
        np.testing.assert_allclose(a.weight, b.weight, rtol=1e-4, atol=1e-5, err_msg=a.name)
        np.testing.assert_allclose(a.bias, b.bias, rtol=1e-4, atol=1e-5, err_msg=a.name)
    # and the whole gradients of one batch, summed over the passes
    loss_one, g_one = tr_one.gradients(x, y)
    loss_micro, g_micro = tr_micro.gradients(x, y)
    assert loss_micro == pytest.approx(loss_one, rel=1e-5)
    assert g_micro.keys() == g_one.keys()
    for key in g_one:
        np.testing.assert_allclose(g_micro[key], g_one[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_micro_batched_step_with_int8_frozen_weights(name):
    base = _models()[name]
    subset = _subset(base, "rows")
    x, y = _batch(base, 15)
    one, micro = base.copy(), base.copy()
    tr_one = ft.Trainer(one, subset, lr=0.05, momentum=0.9, frozen="int8")
    tr_micro = ft.Trainer(micro, subset, lr=0.05, momentum=0.9, frozen="int8", micro_batch=4)
    for _ in range(3):
        assert tr_micro.step(x, y) == pytest.approx(tr_one.step(x, y), rel=1e-5)
    np.testing.assert_allclose(micro.predict(x), one.predict(x), rtol=1e-4, atol=1e-5)


def _cnn28():
    model = ft.zoo("cnn", (1, 28, 28), 10, seed=0)
    names = [layer.name for layer in model.param_layers]
    return model, ft.Subset.of(model, {names[-1]: {"rows": "all", "bias": True},
                                       names[-2]: {"rows": 0.25, "bias": False}})


@pytest.mark.parametrize("n", [32, 30])
@pytest.mark.parametrize("frozen", ["float32", "int8"])
def test_micro_batch_memory_is_predicted_and_scales_with_the_pass(n, frozen):
    K.set_num_threads(1)
    try:
        records = {}
        for m in (0, 8, 4):
            model, subset = _cnn28()
            x, y = _batch(model, n)
            tr = ft.Trainer(model, subset, momentum=0.9, frozen=frozen, micro_batch=m)
            tr.step(x, y)
            buffers = {k: id(v) for k, v in tr.arena._buffers.items()}
            tr.step(x, y)  # the same buffers: the shorter last pass lives in the full passes' ones
            assert {k: id(v) for k, v in tr.arena._buffers.items()} == buffers
            want = ft.predict_memory(model, subset, n, momentum=0.9, threads=1, frozen=frozen, micro_batch=m)
            assert tr.memory.as_dict() == want, m
            records[m] = want
    finally:
        K.set_num_threads(0)
    held = {m: r["activations"] + r["workspace"] for m, r in records.items()}
    assert held[8] < 0.55 * held[0] and held[4] < 0.35 * held[0], held
    # the price: whole gradients of the trained parameters
    assert records[0]["gradients"] == 0 and records[4]["gradients"] == records[4]["trainable_weights"]


def test_micro_batch_errors():
    model, subset = _cnn28()
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="micro_batch must be an integer >= 0"):
            ft.Trainer(model.copy(), subset, micro_batch=bad)
        with pytest.raises(ValueError, match="micro_batch must be an integer >= 0"):
            ft.predict_memory(model, subset, 32, micro_batch=bad)


# -- the lever in the fleet: task setting, subset search, local training -----------------------------

def test_task_config_carries_micro_batch():
    from ftte_core.local import TaskConfig
    assert TaskConfig().micro_batch == 0
    assert "micro_batch" not in TaskConfig().as_dict()  # the default goes unsaid on the wire
    assert TaskConfig.from_dict(TaskConfig(micro_batch=4).as_dict()).micro_batch == 4
    for bad, why in ((-1, "between 0"), (1 << 20, "between 0"), (2.0, "whole number"), (True, "whole number")):
        with pytest.raises(ValueError, match=f"micro_batch must be .*{why}"):
            TaskConfig.from_dict({"micro_batch": bad})


def _scores(model, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for layer in model.param_layers:
        out[f"{layer.name}.weight"] = rng.random(layer.weight_shape[0]).tolist()
        out[f"{layer.name}.bias"] = float(rng.random())
    return out


def test_search_turns_to_micro_batches_only_where_no_one_pass_step_fits():
    from ftte_core.search import BudgetTooSmall, micro_batch_options, search_subset
    assert micro_batch_options(32) == [16, 8, 4, 2] and micro_batch_options(4) == [2] and micro_batch_options(3) == []
    model, _ = _cnn28()
    scores = _scores(model)
    with pytest.raises(BudgetTooSmall) as one_pass:
        search_subset(model, scores, 0, batch_size=32, frozen="int8")
    floor = one_pass.value.minimum_bytes
    # at and above the one-pass floor the picks are as before: no micro-batches
    for budget in (floor, int(1.5 * floor)):
        got = search_subset(model, scores, budget, batch_size=32, frozen="auto")
        assert got.micro_batch == 0 and got.predicted_bytes <= budget
    # below it, micro-batched steps let a subset fit, priced as the trainer will hold it
    for share in (0.8, 0.6, 0.45):
        budget = int(share * floor)
        got = search_subset(model, scores, budget, batch_size=32, frozen="auto")
        assert got.micro_batch in micro_batch_options(32) and got.predicted_bytes <= budget, share
        assert got.predicted_bytes == ft.predict_memory(model, got.subset, 32, frozen=got.frozen,
                                                        micro_batch=got.micro_batch)["total"]
        assert "micro-batches of" in got.format_table()
    # below every lever: the refusal names the cheapest subset of all, in micro-batches of 2
    with pytest.raises(BudgetTooSmall, match=r"batch size 32 in micro-batches of 2\) needs") as e:
        search_subset(model, scores, 1000, batch_size=32, frozen="auto")
    assert e.value.minimum_bytes < 0.5 * floor


def test_local_worker_trains_in_the_tasks_micro_batches():
    from ftte_core.local import LocalWorker, TaskConfig
    from ftte_core.update import subset_values
    model, subset = _cnn28()
    x, y = _batch(model, 40)
    K.set_num_threads(1)
    try:
        got = {}
        for micro in (0, 4):
            m = model.copy()
            worker = LocalWorker(m, subset)
            result = worker.run(subset_values(m, subset), 0, x, y, TaskConfig(batch_size=16, max_steps=2,
                                                                             micro_batch=micro))
            want = ft.predict_memory(model, subset, 16, micro_batch=micro, threads=1)
            assert result.memory.as_dict() == want
            got[micro] = result
    finally:
        K.set_num_threads(0)
    assert got[4].memory.total < 0.6 * got[0].memory.total
    for a, b in zip(got[4].update.tensors, got[0].update.tensors):  # the same training, the same update
        np.testing.assert_allclose(a.data * a.scales[:, None], b.data * b.scales[:, None], rtol=0, atol=2e-2)


def test_micro_batch_shorter_batches_first_then_longer_hold_one_set_of_buffers():
    """A batch no longer than a pass (a device with few samples) plans just that; a later longer
    batch's passes then hold the buffers, and the shorter plan lives in them: what the arena
    records is the prediction for the batch in force, never two sets of buffers."""
    K.set_num_threads(1)
    try:
        model, subset = _cnn28()
        tr = ft.Trainer(model, subset, micro_batch=8)
        x, y = _batch(model, 32)
        tr.step(x[:5], y[:5])
        assert tr.memory.as_dict() == ft.predict_memory(model, subset, 5, threads=1, micro_batch=8)
        tr.step(x, y)
        want = ft.predict_memory(model, subset, 32, threads=1, micro_batch=8)
        assert tr.memory.as_dict() == want
        tr.step(x[:5], y[:5])  # back to the short batch: inside the longer buffers, nothing new
        assert tr.memory.as_dict() == want
        assert set(tr._plans) == {8, 5}
    finally:
        K.set_num_threads(0)
