"""How tests/data/torch_*.onnx were made (PyTorch 2.13 CPU, TorchScript exporter); not run by the
tests, which need no torch. The files are small real exports: a conv stem with BatchNorm, a block
with a depthwise conv, ReLU6, a residual Add and HardSwish, global pooling, Linear + BatchNorm1d
and SiLU. `PRESERVE` keeps every BatchNorm as its own node (and aliases equal initializers through
Identity nodes); `EVAL` fuses the BatchNorms that follow a Conv into it."""
import numpy as np
import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = nn.functional.relu6(self.b2(self.dw(y)))
        return nn.functional.hardswish(y + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.bn1 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x)
        x = torch.flatten(self.pool(x), 1)
        return nn.functional.silu(self.bn1(self.fc(x)))


if __name__ == "__main__":
    torch.manual_seed(0)
    net = Net()
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(4, 3, 16, 16)
    for mode, opset in (("PRESERVE", 13), ("EVAL", 17)):
        torch.onnx.export(net, (x,), f"torch_{mode.lower()}_opset{opset}.onnx", input_names=["input"],
                          output_names=["logits"], opset_version=opset, dynamo=False,
                          training=getattr(torch.onnx.TrainingMode, mode),
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    np.savez("torch_exports_io.npz", x=x.numpy(), logits=net(x).detach().numpy())
