import numpy as np
import pytest

from ftte_core.zoo import zoo, zoo_names


def _kinds(m):
    return [(l.name, l.kind) for l in m.layers]


def test_mlp_structure_and_params():
    m = zoo("mlp", (64,), 10)
    assert _kinds(m) == [("fc1", "dense"), ("relu1", "relu"), ("fc2", "dense"), ("relu2", "relu"),
                         ("fc3", "dense")]
    assert m.shapes == [(64,), (256,), (256,), (256,), (256,), (10,)]
    assert m.num_params() == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    m = zoo("mlp", (784,), 10, hidden=(128,))
    assert _kinds(m) == [("fc1", "dense"), ("relu1", "relu"), ("fc2", "dense")]
    assert m.num_params() == 784 * 128 + 128 + 128 * 10 + 10
    m = zoo("mlp", (1, 8, 8), 3, hidden=())
    assert _kinds(m) == [("flatten", "flatten"), ("fc1", "dense")]
    assert m.shapes[-1] == (3,) and m.num_params() == 64 * 3 + 3


@pytest.mark.parametrize("shape,flat", [((1, 8, 8), 16 * 2 * 2), ((1, 28, 28), 16 * 7 * 7),
                                        ((3, 32, 32), 16 * 8 * 8)])
def test_cnn_structure_and_params(shape, flat):
    m = zoo("cnn", shape, 10)
    assert [l.name for l in m.layers] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "flatten", "fc1"]
    c, h, w = shape
    assert m.shapes[1] == (8, h, w) and m.shapes[3] == (8, h // 2, w // 2)
    assert m.shapes[6] == (16, h // 4, w // 4) and m.shapes[7] == (flat,) and m.shapes[8] == (10,)
    assert m.layer("conv1").padding == (1, 1, 1, 1) and m.layer("conv1").stride == (1, 1)
    assert m.layer("pool1").kernel == (2, 2) and m.layer("pool1").stride == (2, 2)
    assert m.num_params() == (8 * c * 9 + 8) + (16 * 8 * 9 + 16) + (flat * 10 + 10)


def test_cnn_options():
    m = zoo("cnn", (3, 32, 32), 5, channels=(4, 6, 8), hidden=(32, 16))
    names = [l.name for l in m.layers]
    assert names[:9] == ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "pool3"]
    assert names[9:] == ["flatten", "fc1", "relu4", "fc2", "relu5", "fc3"]
    assert m.shapes[10] == (8 * 4 * 4,) and m.shapes[-1] == (5,)
    with pytest.raises(ValueError, match="too small"):
        zoo("cnn", (1, 8, 8), 10, channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        zoo("cnn", (64,), 10)


def test_init_he_uniform_bias_zero_and_seeded():
    a, b, c = zoo("cnn", (1, 28, 28), 10, seed=5), zoo("cnn", (1, 28, 28), 10, seed=5), zoo("cnn", (1, 28, 28), 10, seed=6)
    for key, value in a.state().items():
        assert value.dtype == np.float32 and value.flags.c_contiguous
        np.testing.assert_array_equal(value, b.state()[key])
        if key.endswith(".bias"):
            assert not value.any()
        else:
            assert not np.array_equal(value, c.state()[key])
    for layer in a.param_layers:
        fan_in = int(np.prod(layer.weight.shape[1:]))
        limit = np.sqrt(6.0 / fan_in)
        assert np.abs(layer.weight).max() <= limit
        # uniform on [-limit, limit]: std = limit / sqrt(3)
        assert abs(layer.weight.std() - limit / np.sqrt(3)) < 0.25 * limit / np.sqrt(3)
    assert not np.array_equal(zoo("mlp", (64,), 10, seed=0).state()["fc1.weight"],
                              zoo("mlp", (64,), 10, seed=1).state()["fc1.weight"])


def test_bad_names_and_options():
    with pytest.raises(ValueError, match=r"unknown zoo model 'resnet'.*cnn, dscnn, mlp"):
        zoo("resnet", (3, 32, 32), 10)
    assert zoo_names() == ["autoencoder", "cnn", "dscnn", "mlp", "mobilenetv1", "resnet8", "sensor1d"]
    with pytest.raises(ValueError, match="unknown option"):
        zoo("mlp", (64,), 10, channels=(8,))
    with pytest.raises(ValueError, match="num_classes"):
        zoo("mlp", (64,), 0)
    with pytest.raises(ValueError, match="input_shape"):
        zoo("mlp", (0,), 10)
    with pytest.raises(ValueError, match="hidden"):
        zoo("mlp", (64,), 10, hidden=(32, -1))


@pytest.mark.parametrize("name,shape", [("mlp", (64,)), ("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                        ("cnn", (3, 32, 32))])
def test_zoo_predicts(name, shape):
    m = zoo(name, shape, 10)
    x = np.random.default_rng(0).normal(size=(3,) + shape).astype(np.float32)
    y = m.predict(x)
    assert y.shape == (3, 10) and y.dtype == np.float32 and np.all(np.isfinite(y))


def test_zoo_does_not_load_onnx():
    # agents build zoo models without paying for the onnx package (see ftte_core.__init__)
    import subprocess
    import sys
    code = ("import sys, ftte_core; ftte_core.zoo('cnn', (1, 8, 8), 10); "
            "assert 'onnx' not in sys.modules, 'zoo imported onnx'")
    subprocess.run([sys.executable, "-c", code], check=True)
