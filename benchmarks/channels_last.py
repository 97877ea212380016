"""Training-step throughput with and without channels_last, per model, on this machine.

Prints a JSON list; benchmarks/run.py stores it and docs/BENCHMARKS.md reports it. The
recipes' ``train.channels_last`` follows what this measures.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from edgesqueeze.models import build_model, get_spec


def steps_per_s(name: str, channels_last: bool, batch: int = 128, steps: int = 12) -> float:
    torch.manual_seed(0)
    spec = get_spec(name)
    model = build_model(name).train()
    x = torch.randn(batch, *spec.input_shape)
    y = torch.randint(0, spec.num_classes, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps + 3):
        if i == 3:  # warm-up done
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def main(names=("squeezenet_mnist", "squeezenet_cifar", "resnet8")) -> list[dict]:
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in names:
        a, b = steps_per_s(name, False), steps_per_s(name, True)
        rows.append({"model": name, "contiguous_steps_s": round(a, 2), "channels_last_steps_s": round(b, 2),
                     "speedup": round(b / a, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
