"""Plain NumPy (float64) forward/backward of a Model, the reference the engine is checked against."""
import numpy as np


def _pad(x, p, value=0.0):
    pt, pl, pb, pr = p
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def _windows(xp, kh, kw, sh, sw, oh, ow):
    n, c = xp.shape[:2]
    out = np.empty((n, c, oh, ow, kh, kw), xp.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
    return out


def layer_forward(layer, x, out_shape):
    k = layer.kind
    n = x.shape[0]
    if k == "dense":
        return x @ layer.weight.astype(np.float64).T + layer.bias
    if k == "conv2d":
        w = layer.weight.astype(np.float64)
        oc, c, kh, kw = w.shape
        _, oh, ow = out_shape
        win = _windows(_pad(x, layer.padding), kh, kw, *layer.stride, oh, ow)
        return np.einsum("ncijhw,ochw->noij", win, w) + layer.bias[None, :, None, None]
    if k == "maxpool2d":
        _, oh, ow = out_shape
        win = _windows(_pad(x, layer.padding, -np.inf), *layer.kernel, *layer.stride, oh, ow)
        return win.max(axis=(4, 5))
    if k == "avgpool2d":
        _, oh, ow = out_shape
        win = _windows(_pad(x, layer.padding), *layer.kernel, *layer.stride, oh, ow)
        ones = _windows(_pad(np.ones((1, 1) + x.shape[2:]), layer.padding), *layer.kernel, *layer.stride, oh, ow)
        cnt = ones.sum(axis=(4, 5)) if not layer.count_include_pad else layer.kernel[0] * layer.kernel[1]
        return win.sum(axis=(4, 5)) / cnt
    if k == "global_avgpool":
        return x.mean(axis=(2, 3), keepdims=True)
    if k == "relu":
        return np.maximum(x, 0)
    if k == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if k == "tanh":
        return np.tanh(x)
    if k == "flatten":
        return x.reshape(n, -1)
    if k == "dropout":
        return x
    raise NotImplementedError(k)


def forward(model, x):
    """Returns the list of activations [x, y0, y1, ...] in float64."""
    acts = [np.asarray(x, np.float64).reshape((x.shape[0],) + model.input_shape)]
    for layer, s_out in zip(model.layers, model.shapes[1:]):
        acts.append(layer_forward(layer, acts[-1], s_out))
    return acts


def loss_and_grads(model, x, labels):
    """Mean softmax cross-entropy and dL/d(param) for every parameter, by finite-free backprop."""
    acts = forward(model, x)
    logits = acts[-1]
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(n), labels]))
    dy = p.copy()
    dy[np.arange(n), labels] -= 1
    dy /= n
    grads = {}
    for i in range(len(model.layers) - 1, -1, -1):
        layer, x_in, y_out = model.layers[i], acts[i], acts[i + 1]
        k = layer.kind
        if k == "dense":
            grads[f"{layer.name}.weight"] = dy.T @ x_in
            grads[f"{layer.name}.bias"] = dy.sum(axis=0)
            dy = dy @ layer.weight.astype(np.float64)
        elif k == "conv2d":
            w = layer.weight.astype(np.float64)
            oc, c, kh, kw = w.shape
            sh, sw = layer.stride
            xp = _pad(x_in, layer.padding)
            oh, ow = y_out.shape[2:]
            win = _windows(xp, kh, kw, sh, sw, oh, ow)
            grads[f"{layer.name}.weight"] = np.einsum("noij,ncijhw->ochw", dy, win)
            grads[f"{layer.name}.bias"] = dy.sum(axis=(0, 2, 3))
            dxp = np.zeros_like(xp)
            dwin = np.einsum("noij,ochw->ncijhw", dy, w)
            for a in range(oh):
                for b in range(ow):
                    dxp[:, :, a * sh:a * sh + kh, b * sw:b * sw + kw] += dwin[:, :, a, b]
            pt, pl, pb, pr = layer.padding
            dy = dxp[:, :, pt:xp.shape[2] - pb, pl:xp.shape[3] - pr]
        elif k == "maxpool2d":
            kh, kw = layer.kernel
            sh, sw = layer.stride
            xp = _pad(x_in, layer.padding, -np.inf)
            dxp = np.zeros_like(xp)
            oh, ow = y_out.shape[2:]
            for a in range(oh):
                for b in range(ow):
                    win = xp[:, :, a * sh:a * sh + kh, b * sw:b * sw + kw].reshape(xp.shape[0], xp.shape[1], -1)
                    idx = win.argmax(axis=2)
                    ii, jj = np.unravel_index(idx, (kh, kw))
                    for nn in range(xp.shape[0]):
                        for cc in range(xp.shape[1]):
                            dxp[nn, cc, a * sh + ii[nn, cc], b * sw + jj[nn, cc]] += dy[nn, cc, a, b]
            pt, pl, pb, pr = layer.padding
            dy = dxp[:, :, pt:xp.shape[2] - pb, pl:xp.shape[3] - pr]
        elif k == "relu":
            dy = dy * (y_out > 0)
        elif k == "sigmoid":
            dy = dy * y_out * (1 - y_out)
        elif k == "tanh":
            dy = dy * (1 - y_out ** 2)
        elif k == "global_avgpool":
            dy = np.broadcast_to(dy, x_in.shape) / (x_in.shape[2] * x_in.shape[3])
        elif k in ("flatten",):
            dy = dy.reshape(x_in.shape)
        elif k == "dropout":
            pass
        else:
            raise NotImplementedError(k)
    return loss, grads
