"""What int8 frozen weights cost in accuracy when fine-tuning on digits (issue 11: goal <= 0.5 point).

    python benchmarks/int8_accuracy.py

A digits MLP (64-64-10, and 64-64-64-10) is trained one epoch on 1400 samples, then fine-tuned
two epochs (lr 0.05, batch 32) on a subset with ``frozen="float32"`` and with ``frozen="int8"``:
"last" (the last layer; the layers below it wholly int8) and "sparse" (the last layer and 25% of
the rows of the layer before it, that layer mixed: its other rows int8). Validation accuracy on
the 397 held-out samples (one sample = 0.25 points), for three batch-order seeds.
tests/test_int8.py holds the one-hidden-layer cases to <= 0.5 point.
"""
import numpy as np

import ftte_core as ft


def main():
    ds = ft.load_bundled("digits")
    idx = np.random.default_rng(0).permutation(len(ds))
    tr, va = idx[:1400], idx[1400:]
    print(f"{'model':<12} {'subset':<7} {'float32 %':<22} {'int8 %':<22} int8 - float32 (points, mean)")
    for hidden in ((64,), (64, 64)):
        base = ft.zoo("mlp", ds.feature_shape, ds.num_classes, seed=0, hidden=hidden)
        ft.Trainer(base, lr=0.1, momentum=0.9).train(ds.x[tr], ds.y[tr], epochs=1, batch_size=32)
        names = [layer.name for layer in base.param_layers]
        for which in ("last", "sparse"):
            spec = {names[-1]: {"rows": "all", "bias": True}}
            if which == "sparse":
                spec[names[-2]] = {"rows": 0.25, "bias": False}
            subset = ft.Subset.of(base, spec)
            acc = {}
            for seed in (1, 2, 3):
                for frozen in ("float32", "int8"):
                    m = base.copy()
                    ft.Trainer(m, subset, lr=0.05, frozen=frozen, seed=seed).train(ds.x[tr], ds.y[tr], epochs=2,
                                                                                   batch_size=32)
                    acc.setdefault(frozen, []).append(100 * m.evaluate(ds.x[va], ds.y[va])[1])
            arch = "-".join(str(v) for v in (64,) + hidden + (10,))
            print(f"{arch:<12} {which:<7} {' '.join(f'{a:.2f}' for a in acc['float32']):<22} "
                  f"{' '.join(f'{a:.2f}' for a in acc['int8']):<22} {np.mean(acc['int8']) - np.mean(acc['float32']):+.2f}")


if __name__ == "__main__":
    main()
