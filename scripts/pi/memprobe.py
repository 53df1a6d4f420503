"""Peak RSS of a fresh process that imports ftte_core and trains the zoo "mlp" on the bundled
digits for 100 steps (batch 32, full subset, momentum 0.9). Used by scripts/pi-check; under
qemu-user the figure includes the emulator's own memory.

Prints one line: "VmHWM_kB <n> accuracy <a> steps <s> seconds <t>".
"""
import time

import numpy as np

import ftte_core as ft

t0 = time.perf_counter()
ds = ft.load_bundled("digits")
model = ft.zoo("mlp", input_shape=ds.feature_shape, num_classes=ds.num_classes, seed=0)
trainer = ft.Trainer(model, None, lr=0.05, momentum=0.9)
rng = np.random.default_rng(0)
steps = 100
for _ in range(steps):
    idx = rng.integers(0, len(ds), 32)
    trainer.step(ds.x[idx], ds.y[idx])
_, acc = model.evaluate(ds.x, ds.y)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(f"VmHWM_kB {hwm} accuracy {acc:.4f} steps {steps} seconds {time.perf_counter() - t0:.1f}")
