"""Train a zoo model on the bundled handwritten digits with the FTTE engine, export ONNX.

    python examples/train_digits.py [--model cnn|mlp] [--epochs 15] [--out ftte-example]

Trains twice from the same start: the whole model, and a sparse subset (last layer plus a
quarter of the rows of the layer before it, as a memory-constrained device would), then reports
accuracy, time and the training memory the engine recorded next to the cost model's prediction,
and writes OUT/model.onnx (the full-model run) and OUT/model-sparse.onnx.
"""
import argparse
import os
import sys
import time

import numpy as np

import ftte_core as ft


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    ap.add_argument("--epochs", type=int, default=15, help="passes over the training split (default 15)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    ap.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    ap.add_argument("--out", default="ftte-example", help="output folder (default ./ftte-example)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    ds = ft.load_bundled("digits")
    train, val = ft.data.train_val_split(ds, val_fraction=0.2, seed=args.seed)
    print(f"data: {ds.name}, {len(train)} train / {len(val)} validation samples, "
          f"{ds.num_classes} classes, {ft.get_num_threads()} kernel threads")
    start = ft.zoo(args.model, ds.feature_shape, ds.num_classes, seed=args.seed)
    print(start.summary())
    names = [layer.name for layer in start.param_layers]
    runs = {
        "full": ft.Subset.full(start),
        "sparse": ft.Subset.of(start, {names[-1]: {"rows": "all", "bias": True},
                                       names[-2]: {"rows": 0.25, "bias": True}}),
    }
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for label, subset in runs.items():
        model = start.copy()
        trainer = ft.Trainer(model, subset, lr=args.lr, momentum=0.9, seed=args.seed)
        print(f"\n[{label}] trains {subset.num_trainable(model):,} of {model.num_params():,} parameters: "
              f"{subset.describe(model)}")
        t0 = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            stats = trainer.train(train.x, train.y, epochs=1, batch_size=args.batch_size)
            loss, acc = model.evaluate(val.x, val.y)
            print(f"  epoch {epoch:>2}/{args.epochs}  train loss {stats.mean_loss:.4f}  "
                  f"val loss {loss:.4f}  val accuracy {acc:.3f}", flush=True)
        seconds = time.perf_counter() - t0
        path = os.path.join(args.out, "model.onnx" if label == "full" else f"model-{label}.onnx")
        ft.save_onnx(model, path)
        recorded = trainer.memory.total
        predicted = ft.predict_memory(model, subset, args.batch_size, momentum=0.9)["total"]
        results[label] = (acc, seconds, recorded, predicted, path)

    print("\nrun     val acc   train time   step memory (recorded / predicted)   ONNX")
    for label, (acc, seconds, recorded, predicted, path) in results.items():
        print(f"{label:<7} {acc:>7.3f}   {seconds:>8.2f} s   {recorded / 1024:>10.1f} KiB / {predicted / 1024:.1f} KiB"
              f"          {path}")
    try:
        import onnxruntime as ort
    except ImportError:
        print("(onnxruntime not installed: skipping the cross-check of the exported model)")
        return 0
    sess = ort.InferenceSession(results["full"][4], providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: val.x.astype(np.float32)})[0]
    print(f"onnxruntime on {results['full'][4]}: val accuracy {np.mean(logits.argmax(1) == val.y):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
