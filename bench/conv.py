"""FAConv2d's cost: one conv layer's forward + backward (with ReLU) against nn.Conv2d trained by
backprop and against a plain-PyTorch FA convolution, at LeNet's and ResNet-20's layer shapes.

    python -m bench.conv              # a GPU (cuDNN), or the CPU
    python -m bench.conv --quick      # smaller batches (CI)

Providers, each conv + ReLU on the same input:

- ``nn.Conv2d (backprop)``: ``nn.Conv2d`` then ``nn.ReLU`` under ordinary autograd;
- ``plain FA conv``: what FA libraries write (BioTorch's layers): an autograd Function that
  saves input, weight and feedback, with the ReLU as a separate module (which saves its own
  output), and sends δ through the feedback with ``conv2d_input``;
- ``FAConv2d (fa)``: fa_triton's layer with the ReLU fused (saves its input and the output, forms
  δ from the output, nothing else); also ``FAConv2d (usf)``, whose B is formed from W's sign.

Reported: ms per fwd+bwd (median), the bytes autograd saves beyond the caller's tensors, and
on CUDA the peak memory of the step.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

# (network, layer, batch, C_in, C_out, kernel, stride, padding, H)
SHAPES = (
    ("LeNet", "conv1", 64, 1, 6, 5, 1, 0, 32),
    ("LeNet", "conv2", 64, 6, 16, 5, 1, 0, 14),
    ("LeNet", "conv3", 64, 16, 120, 5, 1, 0, 5),
    ("ResNet-20", "stage1", 128, 16, 16, 3, 1, 1, 32),
    ("ResNet-20", "stage2 down", 128, 16, 32, 3, 2, 1, 32),
    ("ResNet-20", "stage3", 128, 64, 64, 3, 1, 1, 8),
)


class PlainFAConv(torch.autograd.Function):
    """The plain FA convolution: saves x, W and B; grad_x through B; the activation is not fused."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding):
        ctx.save_for_backward(x, weight, feedback)
        ctx.conv = (stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight, feedback = ctx.saved_tensors
        stride, padding = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(x.shape, feedback, grad, stride, padding)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding)
        return grad_x, grad_w, grad.sum((0, 2, 3)), None, None, None


def providers(c_in, c_out, k, stride, padding, device, dtype):
    from fa_triton import FAConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, device=device, dtype=dtype)
    feedback = torch.randn_like(conv.weight) * 0.1
    fa = FAConv2d(c_in, c_out, k, stride, padding, activation="relu", method="fa", device=device, dtype=dtype)
    usf = FAConv2d(c_in, c_out, k, stride, padding, activation="relu", method="usf", device=device, dtype=dtype)
    relu = nn.ReLU()
    return {
        "nn.Conv2d (backprop)": (lambda x: relu(conv(x)), list(conv.parameters())),
        "plain FA conv": (lambda x: relu(PlainFAConv.apply(x, conv.weight, conv.bias, feedback, stride, padding)),
                          [*conv.parameters(), feedback]),
        "FAConv2d (fa)": (fa, [*fa.parameters(), *fa.buffers()]),
        "FAConv2d (usf)": (usf, [*usf.parameters(), *usf.buffers()]),
    }


def measure(batch, c_in, c_out, k, stride, padding, h, device, dtype=torch.float32, rep_ms=50, cpu_samples=25):
    """{provider: (ms, saved bytes, peak bytes or None)} for one layer shape."""
    from .memory import _saved_and_peak
    from .methods import _timer

    timer = _timer(device, rep_ms, cpu_samples)
    x = torch.randn(batch, c_in, h, h, device=device, dtype=dtype, requires_grad=True)
    results = {}
    for name, (forward, owned) in providers(c_in, c_out, k, stride, padding, device, dtype).items():
        grad = torch.randn_like(forward(x))

        def step(forward=forward, grad=grad):
            forward(x).backward(grad)

        ms = timer(step)
        saved, peak = _saved_and_peak(lambda forward=forward: forward(x), grad, device, [x, *owned])
        results[name] = (ms, saved, peak)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"conv + ReLU, fwd+bwd, fp32 | {where} | torch {torch.__version__}")
    for network, layer, batch, c_in, c_out, k, stride, padding, h in SHAPES:
        batch = 4 if args.quick else batch
        print(f"\n{network} {layer}: batch {batch}, {c_in}->{c_out}, {k}x{k}, stride {stride}, {h}x{h}")
        results = measure(batch, c_in, c_out, k, stride, padding, h, device, cpu_samples=5 if args.quick else 25)
        base = results["nn.Conv2d (backprop)"][0]
        for name, (ms, saved, peak) in results.items():
            peak_text = "" if peak is None else f"  peak {peak / 2**20:8.2f} MiB"
            print(f"  {name:22s} {ms:9.3f} ms ({base / ms:4.2f}x backprop)  saved {saved / 2**20:8.2f} MiB"
                  f"{peak_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
