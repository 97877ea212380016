"""Streaming image folders against the in-memory path: peak memory and throughput.

    python benchmarks/stream.py [--images 20000] [--skip-memory] [--skip-throughput]

1. **Memory.** Writes ``--images`` generated 224x224 RGB JPEGs (10 class folders, quality 90)
   to runs/bench/stream-jpegs/ once, then, each in a fresh process, one training-style pass
   (batch 64, shuffled, random crop + flip) over them:
   - streamed: ``load_dataset("imagefolder:...", stream=True)``, 2 DataLoader workers;
   - in memory: ``load_dataset("imagefolder:...")``, every image decoded into one array
     (its cache written to a temporary ``$EDGESQUEEZE_CACHE``, removed afterwards).
   Peak memory is the largest sum over the process and its children (the workers), sampled
   every 50 ms from /proc/PID/smaps_rollup, as RSS (which counts the pages a forked worker
   shares with its parent once per process: an overcount) and as PSS (shared pages split
   among their sharers: what the processes really hold); wall time of the load and pass.
2. **Throughput on CIFAR-size images.** The CIFAR-10 JPEG copy (45,000 training images of
   32x32) as ``imagefolder:`` streamed (2 workers, decoded from the zip every pass) against
   the in-memory ``cifar10`` array: images per second of training ResNet-8 (batch 128,
   SGD), and of the loader alone, the two paths interleaved in rounds of 60 batches so
   that a shared machine slows both alike.

Writes benchmarks/results/stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from run import log, save  # noqa: E402

JPEGS = ROOT / "runs" / "bench" / "stream-jpegs"


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB. Forked workers share the parent's pages: summing RSS
    counts those once per process, PSS splits them among the processes sharing them."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


class PeakRSS:
    """Largest RSS and PSS summed over this process and its descendants, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak_kb = self.peak_pss_kb = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            mem = [_mem_kb(p) for p in _tree(os.getpid())]
            self.peak_kb = max(self.peak_kb, sum(r for r, _ in mem))
            self.peak_pss_kb = max(self.peak_pss_kb, sum(p for _, p in mem))
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def make_jpegs(n: int) -> None:
    import numpy as np
    from PIL import Image

    done = JPEGS / f".done-{n}"
    if done.exists():
        return
    shutil.rmtree(JPEGS, ignore_errors=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(n):
        c = i % 10
        d = JPEGS / "train" / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth random content (a 14x14 noise field upsampled), so JPEG sizes are photo-like
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((224, 224), Image.BICUBIC)
        img.save(d / f"{i:06d}.jpg", quality=90)
    done.touch()
    log(f"wrote {n} JPEGs to {JPEGS} in {time.perf_counter() - t0:.0f} s")


def one_pass(stream: bool) -> dict:
    """Run in a child process: load, then one shuffled, augmented pass at batch 64."""
    import torch

    from edgesqueeze.data import batches, default_augment, load_dataset

    torch.set_num_threads(1)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        ds = load_dataset(f"imagefolder:{JPEGS}", stream=stream)
        t_load = time.perf_counter() - t0
        load_pss = peak.peak_pss_kb
        n = 0
        t1 = time.perf_counter()
        for xb, _ in batches(ds.train_x, ds.train_y, batch_size=64, shuffle=True,
                             generator=torch.Generator().manual_seed(0), mean=ds.mean, std=ds.std,
                             augment=default_augment("cifar10"), drop_last=True, workers=2):
            n += len(xb)
        t_pass = time.perf_counter() - t1
    return {"stream": stream, "images": n, "load_s": round(t_load, 1), "pass_s": round(t_pass, 1),
            "images_per_s": round(n / t_pass, 1), "peak_rss_sum_mb": round(peak.peak_kb / 1024, 1),
            "peak_pss_sum_mb": round(peak.peak_pss_kb / 1024, 1), "load_peak_pss_mb": round(load_pss / 1024, 1)}


def memory(n: int) -> list[dict]:
    make_jpegs(n)
    rows = []
    for stream in (True, False):
        cache = tempfile.mkdtemp(prefix="esq-cache-")
        try:
            env = {**os.environ, "EDGESQUEEZE_CACHE": cache, "PYTHONPATH": str(ROOT)}
            res = subprocess.run([sys.executable, __file__, "--child", "stream" if stream else "memory"],
                                 env=env, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        log(f"{'streamed ' if stream else 'in memory'}: {row}")
        rows.append(row)
    return rows


def throughput(rounds: int = 4, per_round: int = 60) -> dict:
    import torch
    from torch import nn

    from edgesqueeze.data import batches, default_augment, load_dataset, split_train_val
    from edgesqueeze.data.datasets import data_search_path
    from edgesqueeze.models import build_model

    torch.set_num_threads(2)
    zp = next(d / "cifar10-jpeg.zip" for d in data_search_path() if (d / "cifar10-jpeg.zip").is_file())
    mem = load_dataset("cifar10")
    lazy = load_dataset(f"imagefolder:{zp}", stream=True)
    (mx, my), _ = split_train_val(mem, 0.1, 0)
    (lx, ly), _ = split_train_val(lazy, 0.1, 0)
    aug = default_augment("cifar10")
    model = build_model("resnet8", num_classes=10, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    out: dict = {"train": {"memory": [], "stream": []}, "loader": {"memory": [], "stream": []}}
    for r in range(rounds):
        for name, (x, y) in (("memory", (mx, my)), ("stream", (lx, ly))):
            for mode in ("loader", "train"):
                it = batches(x, y, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(r),
                             mean=mem.mean, std=mem.std, augment=aug, drop_last=True, workers=2)
                n, t0 = 0, time.perf_counter()
                for i, (xb, yb) in enumerate(it):
                    if mode == "train":
                        loss = loss_fn(model(xb), yb)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                    n += len(xb)
                    if i + 1 == per_round:
                        break
                del it
                out[mode][name].append(round(n / (time.perf_counter() - t0), 1))
        log(f"round {r + 1}/{rounds}: {json.dumps(out)}")
    import statistics

    summary = {mode: {name: statistics.median(v) for name, v in d.items()} for mode, d in out.items()}
    for mode in summary:
        s = summary[mode]
        s["stream_over_memory"] = round(s["stream"] / s["memory"], 3)
    return {"rounds": out, "median_images_per_s": summary, "images": "CIFAR-10 JPEG 32x32, batch 128",
            "model": "resnet8 (SGD, 2 threads)", "workers": 2}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(one_pass(sys.argv[2] == "stream")))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    path = ROOT / "benchmarks" / "results" / "stream.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.pop("machine", None)
    result.pop("command", None)
    if not args.skip_memory:
        result["memory"] = {"images": args.images, "size": "224x224 JPEG", "batch": 64, "workers": 2,
                            "runs": memory(args.images)}
        save("stream", result)
    if not args.skip_throughput:
        result["throughput"] = throughput()
        save("stream", result)


if __name__ == "__main__":
    main()
