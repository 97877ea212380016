#!/usr/bin/env python3
"""Run exported artifacts on a device and on the host, and compare their outputs per file.

Three steps, driven by ``tools/device-check.sh`` (or by hand)::

    python tools/device_check.py prepare --out DIR FILE...     # host: inputs, host logits
    python tools/device_check.py run --dir DIR --out device    # device: device logits
    python tools/device_check.py compare --dir DIR [--json OUT] [--markdown OUT]

``prepare`` (host, full install) loads each artifact's test split once per dataset into
``DIR/inputs-<dataset>.npz`` (``x`` uint8 NCHW, ``y`` labels), copies the artifacts into
``DIR/models/``, runs them through :mod:`edgesqueeze.runtime` and saves
``DIR/host/<name>.npy`` (logits), and writes ``DIR/manifest.json``. ``run`` (device: numpy
and edgesqueeze.runtime only, no torch) does the same for every artifact in the manifest into
``DIR/<out>/``, plus ``env.json``. ``compare`` reports, per artifact, the top-1 agreement
between the two sides, each side's accuracy and the largest absolute logit difference.

Exit codes: 0 every artifact agrees 100% on top-1 (``compare``), or the step succeeded;
1 an artifact disagrees, failed to run on the device, or torch was imported where it must not
be; 2 bad usage or bad input (a missing or malformed file).

This file must stay importable without torch and without the host-only parts of edgesqueeze:
``run`` and ``compare`` need numpy (and ``run`` edgesqueeze.runtime) only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import uuid
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "edgesqueeze.device-check"
VERSION = 1
HOST_DIR = "host"
MODELS_DIR = "models"
PACKAGES = ("numpy", "onnxruntime", "ai-edge-litert", "tflite-runtime", "edgesqueeze")


class BadInput(Exception):
    """Bad usage or a missing / malformed file: exit 2."""


# --------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe(text: str) -> str:
    """A file-name-safe form of a dataset name (``imagefolder:/a/b`` -> ``imagefolder-a-b``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "data"


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where this ran: machine, the CPU as the runtimes see it (which int8 kernels they pick),
    python, package versions, and whether torch got imported."""
    from edgesqueeze.runtime.cpu import cpu_info

    return {
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "system": platform.system(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_imported": "torch" in sys.modules,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file; run `prepare --out {root}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a readable manifest ({_first_line(exc)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(manifest.get("artifacts"), dict):
        raise BadInput(f"{path}: not a device-check manifest (format {FORMAT!r} with 'artifacts')")
    return manifest


def load_inputs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (OSError, KeyError, ValueError) as exc:
        raise BadInput(f"{path}: not an inputs file with x and y ({_first_line(exc)})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
        raise BadInput(f"{path}: expected x uint8 (N, C, H, W) and y (N,), got x {x.dtype} "
                       f"{list(x.shape)}, y {list(y.shape)}")
    return x, y


def load_logits(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path}: not a .npy array ({_first_line(exc)})") from None
    if not isinstance(a, np.ndarray) or a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
        raise BadInput(f"{path}: expected float logits (N, K), got {getattr(a, 'dtype', type(a))} "
                       f"{list(getattr(a, 'shape', []))}")
    return a


def run_artifact(path: Path, x: np.ndarray, threads: int | None, batch_size: int):
    """(logits float32 (N, K), artifact) through the torch-free runtime."""
    from edgesqueeze.runtime import load

    art = load(path, threads=threads)
    scores = np.asarray(art.predict_images(x, batch_size=batch_size), dtype=np.float32)
    if scores.ndim != 2 or len(scores) != len(x):
        raise BadInput(f"{path}: gave scores of shape {list(scores.shape)} for {len(x)} images")
    return scores, art


# --------------------------------------------------------------------------- prepare (host)

def _unique_name(name: str, parent: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    cand = f"{_safe(parent)}-{name}"
    i = 2
    while cand in taken:
        cand = f"{_safe(parent)}-{i}-{name}"
        i += 1
    return cand


def prepare(args) -> int:
    from edgesqueeze.errors import EdgesqueezeError
    from edgesqueeze.runtime import load

    out = Path(args.out)
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise BadInput(f"{f}: no such file")
    # A fresh manifest, logits and models: nothing of an earlier run may be compared by mistake.
    for sub in (HOST_DIR, MODELS_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    for old in list(out.glob("inputs-*.npz")) + [out / MANIFEST]:
        if old.is_file():
            old.unlink()
    (out / MODELS_DIR).mkdir(parents=True, exist_ok=True)

    datasets: dict[tuple[str, tuple], str] = {}  # (dataset, image shape) -> inputs file name
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    inputs_info: dict[str, Any] = {}
    artifacts: dict[str, Any] = {}
    taken: set[str] = set()
    for f in files:
        try:
            art = load(f, threads=args.threads)
        except (EdgesqueezeError, OSError, ValueError, RuntimeError) as exc:
            raise BadInput(f"{f}: the runtime cannot load it on the host: {_first_line(exc)}") from None
        meta = art.meta or {}
        if not meta:
            raise BadInput(f"{f}: has no edgesqueeze metadata (dataset, normalization unknown); export "
                           f"it with `edgesqueeze export`")
        name = args.data or meta.get("dataset")
        if not name:
            raise BadInput(f"{f}: its metadata records no dataset; pass --data NAME")
        shape = tuple(int(v) for v in (meta.get("input_shape") or art.input_spec.image_shape or ()) if v)
        key = (name, shape)
        if key not in datasets:
            x, y, ds_name, classes = _load_test_split(name, shape, args, str(f))
            stem = f"inputs-{_safe(ds_name)}"
            fname = f"{stem}.npz"
            if fname in inputs_info:  # the same dataset at another image size
                fname = f"{stem}-{'x'.join(map(str, x.shape[1:]))}.npz"
            np.savez_compressed(out / fname, x=x, y=y)
            datasets[key] = fname
            cache[fname] = (x, y)
            inputs_info[fname] = {"dataset": ds_name, "n": len(x), "shape": list(x.shape[1:]),
                                  "classes": classes, "limit": args.limit, "sha256": sha256_file(out / fname)}
            print(f"inputs: {fname}: {len(x):,} test images of {ds_name} {list(x.shape[1:])}")
        fname = datasets[key]
        x, y = cache[fname]
        aname = _unique_name(f.name, f.parent.name, taken)
        taken.add(aname)
        dst = out / MODELS_DIR / aname
        shutil.copyfile(f, dst)
        t0 = time.perf_counter()
        try:
            scores, art = run_artifact(dst, x, args.threads, args.batch_size)
        except (EdgesqueezeError, OSError, ValueError, RuntimeError) as exc:
            raise BadInput(f"{f}: the runtime cannot run it on the host: {_first_line(exc)}") from None
        n_classes = inputs_info[fname]["classes"]
        if n_classes is not None and scores.shape[1] != n_classes:
            raise BadInput(f"{f}: outputs {scores.shape[1]} classes but the dataset '{name}' has "
                           f"{n_classes}; pass the dataset it was made for (--data)")
        _save_npy(out / HOST_DIR / f"{aname}.npy", scores)
        acc = float((scores.argmax(1) == y).mean())
        artifacts[aname] = {"file": f"{MODELS_DIR}/{aname}", "source": str(f.resolve()),
                            "sha256": sha256_file(dst), "bytes": dst.stat().st_size, "inputs": fname,
                            "dataset": inputs_info[fname]["dataset"], "kind": art.kind,
                            "host_backend": art.backend}
        print(f"host: {aname} [{art.kind}, {art.backend}]: {len(x):,} images, accuracy {100 * acc:.2f}% "
              f"({time.perf_counter() - t0:.1f} s)")
    # The id ties results to this prepare: compare refuses logits a run of another prepare left.
    run_id = uuid.uuid4().hex
    _write_json(out / HOST_DIR / "env.json", {**environment(), "threads": args.threads, "manifest_id": run_id})
    _write_json(out / MANIFEST, {"format": FORMAT, "version": VERSION, "id": run_id, "threads": args.threads,
                                 "batch_size": args.batch_size, "inputs": inputs_info,
                                 "artifacts": artifacts})
    print(f"prepared {len(artifacts)} artifact(s) in {out}")
    return 0


def _load_test_split(name: str, shape: tuple, args, source: str):
    """(x uint8 NCHW, y int64, dataset name, number of classes): the test split, as verify loads it."""
    from edgesqueeze.data import load_dataset
    from edgesqueeze.errors import EdgesqueezeError

    image_size = int(shape[-1]) if shape and name.startswith("imagefolder:") else None
    try:
        ds = load_dataset(name, data_dir=args.data_dir, image_size=image_size)
    except EdgesqueezeError as exc:
        raise BadInput(f"{source}: cannot load its dataset: {exc}") from None
    x, y = ds.test_x, ds.test_y
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    if not len(x):
        raise BadInput(f"dataset '{name}' has no test images")
    if shape and list(x.shape[1:]) != list(shape):
        raise BadInput(f"{source}: expects images of shape {list(shape)} but dataset '{name}' gives "
                       f"{list(x.shape[1:])}; pass the dataset it was made for (--data)")
    classes = len(ds.classes) if ds.classes is not None else None
    return np.ascontiguousarray(x), np.asarray(y, np.int64), ds.name, classes


# --------------------------------------------------------------------------- run (device)

def run(args) -> int:
    root = Path(args.dir)
    manifest = read_manifest(root)
    out = root / args.out
    if out.resolve() == root.resolve() or args.out in (MODELS_DIR, HOST_DIR):
        raise BadInput(f"--out {args.out!r} would overwrite the prepared files; pick a subfolder name")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    threads = args.threads if args.threads is not None else manifest.get("threads")
    batch = args.batch_size or manifest.get("batch_size") or 32
    torch_before = "torch" in sys.modules
    errors: dict[str, str] = {}
    results: dict[str, Any] = {}
    inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, entry in manifest["artifacts"].items():
        path = root / entry["file"]
        if not path.is_file():
            raise BadInput(f"{path}: no such file (listed in {root / MANIFEST})")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            raise BadInput(f"{path}: sha256 {digest[:12]}... is not the manifest's "
                           f"{str(entry.get('sha256'))[:12]}...; the copy is damaged")
        fname = entry["inputs"]
        if fname not in inputs:
            inputs[fname] = load_inputs(root / fname)
        x, y = inputs[fname]
        t0 = time.perf_counter()
        try:
            scores, art = run_artifact(path, x, threads, batch)
        except Exception as exc:  # noqa: BLE001 - a device runtime failing is a finding, not a crash
            errors[name] = f"{type(exc).__name__}: {_first_line(exc)}"
            print(f"{args.out}: {name}: FAILED: {errors[name]}", file=sys.stderr)
            continue
        _save_npy(out / f"{name}.npy", scores)
        results[name] = {"backend": art.backend, "kind": art.kind, "seconds": round(time.perf_counter() - t0, 3)}
        acc = float((scores.argmax(1) == y).mean())
        print(f"{args.out}: {name} [{art.kind}, {art.backend}]: {len(x):,} images, accuracy {100 * acc:.2f}%")
    env = {**environment(), "manifest_id": manifest.get("id"), "threads": threads,
           "torch_imported_before": torch_before,
           "artifacts": results, "errors": errors}
    _write_json(out / "env.json", env)
    print(f"{args.out}: {env['machine']}, python {env['python']}, "
          + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
          + f"; torch imported: {'YES' if env['torch_imported'] else 'no'}")
    if args.require_no_torch and env["torch_imported"]:
        print(f"{args.out}: error: torch was imported while loading and running the models",
              file=sys.stderr)
        return 1
    return 1 if errors else 0


# --------------------------------------------------------------------------- compare

def _read_env(path: Path) -> dict[str, Any]:
    try:
        env = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not readable JSON ({_first_line(exc)})") from None
    return env if isinstance(env, dict) else {}


def compare_dirs(root: Path, host: str = HOST_DIR, device: str = "device") -> dict[str, Any]:
    """The comparison as a dict; raises :class:`BadInput` for missing or malformed files."""
    manifest = read_manifest(root)
    if not manifest["artifacts"]:
        raise BadInput(f"{root / MANIFEST}: lists no artifacts")
    host_env = _read_env(root / host / "env.json")
    dev_env = _read_env(root / device / "env.json")
    for sub, env in ((host, host_env), (device, dev_env)):
        if not env:
            raise BadInput(f"{root / sub / 'env.json'}: no such file; "
                           + ("run `prepare` first" if sub == host
                              else f"run `run --dir {root} --out {sub}` first"))
        if env.get("manifest_id") != manifest.get("id"):
            raise BadInput(f"{root / sub}: holds results of another `prepare` (manifest id "
                           f"{env.get('manifest_id')} is not {manifest.get('id')}); run it again")
    dev_errors = dev_env.get("errors") or {}
    rows = []
    inputs: dict[str, np.ndarray] = {}
    for name, entry in manifest["artifacts"].items():
        fname = entry["inputs"]
        if fname not in inputs:
            inputs[fname] = load_inputs(root / fname)[1]
        y = inputs[fname]
        row: dict[str, Any] = {"artifact": name, "kind": entry.get("kind"), "dataset": entry.get("dataset"),
                               "n": len(y), "agreement": None, "disagree": None,
                               "host_accuracy": None, "device_accuracy": None, "max_abs_diff": None,
                               "rows_differing": None, "disagreeing_images": [], "host_margins": [],
                               "error": None, "ok": False}
        h = load_logits(root / host / f"{name}.npy")
        dev_path = root / device / f"{name}.npy"
        if not dev_path.is_file() and name in dev_errors:
            row["error"] = f"did not run on the device: {dev_errors[name]}"
            row["host_accuracy"] = float((h.argmax(1) == y).mean()) if len(h) == len(y) else None
            rows.append(row)
            continue
        d = load_logits(dev_path)
        for side, a in (("host", h), ("device", d)):
            if len(a) != len(y):
                raise BadInput(f"{root / (host if side == 'host' else device) / (name + '.npy')}: "
                               f"{len(a)} rows for {len(y)} images")
        if h.shape != d.shape:
            raise BadInput(f"{name}: host logits {list(h.shape)} and device logits {list(d.shape)} differ "
                           f"in shape")
        ph, pd = h.argmax(1), d.argmax(1)
        diff = np.abs(h.astype(np.float64) - d.astype(np.float64))
        bad = np.flatnonzero(ph != pd)
        # How close the host's top two were on the images that flipped: a near-tie flips on a
        # one-quantization-step difference, a wide margin means something else is wrong.
        top2 = np.sort(h[bad], axis=1)[:, -2:] if len(bad) and h.shape[1] > 1 else np.zeros((0, 2))
        row.update(agreement=float((ph == pd).mean()), disagree=len(bad),
                   host_accuracy=float((ph == y).mean()), device_accuracy=float((pd == y).mean()),
                   max_abs_diff=float(np.nanmax(diff)) if np.isfinite(diff).all() else float("inf"),
                   rows_differing=float((diff.max(axis=1) > 0).mean()) if diff.size else 0.0,
                   disagreeing_images=[int(i) for i in bad[:20]],
                   host_margins=[float(m) for m in (top2[:, 1] - top2[:, 0])[:20]], ok=bool(len(bad) == 0))
        rows.append(row)

    def env_summary(env):
        if not env:
            return None
        return {k: env.get(k) for k in ("machine", "cpu", "python", "packages", "torch_imported", "threads")}

    return {"format": FORMAT + ".compare", "dir": str(root), "host": env_summary(host_env),
            "device": env_summary(dev_env), "ok": all(r["ok"] for r in rows), "artifacts": rows}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _diff(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def _env_line(label: str, env: dict | None) -> str:
    if not env:
        return f"{label}: (no env.json)"
    pk = env.get("packages") or {}
    vers = ", ".join(f"{k} {v}" for k, v in pk.items() if v and k != "edgesqueeze")
    torch = {True: "yes", False: "no"}.get(env.get("torch_imported"), "?")
    kernels = (env.get("cpu") or {}).get("int8_kernels")
    if kernels and (env.get("cpu") or {}).get("note"):  # emulated: /proc/cpuinfo is the host's
        kernels += "; the process's CPU, not /proc/cpuinfo's"
    where = f"{env.get('machine')} ({kernels})" if kernels else env.get("machine")
    return f"{label}: {where}, python {env.get('python')}, {vers}; torch imported: {torch}"


def render_text(report: dict[str, Any]) -> str:
    head = ("artifact", "n", "top-1 agree", "host acc", "device acc", "max |dlogit|", "")
    lines = [[r["artifact"], str(r["n"]), _pct(r["agreement"]), _pct(r["host_accuracy"]),
              _pct(r["device_accuracy"]), _diff(r["max_abs_diff"]),
              "ok" if r["ok"] else (f"ERROR: {r['error']}" if r["error"]
                                    else f"DIFFERS on {r['disagree']} image(s), host top-2 margin "
                                         f"<= {max(r['host_margins'], default=0):.3g}")]
             for r in report["artifacts"]]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [fmt(head)] + [fmt(l) for l in lines]
    out += [_env_line("host", report["host"]), _env_line("device", report["device"]),
            "all artifacts agree on top-1" if report["ok"] else "NOT all artifacts agree on top-1"]
    return "\n".join(out)


def render_markdown(report: dict[str, Any]) -> str:
    out = ["# Device check: host vs device, same files, same images", "",
           ("| artifact | images | top-1 agreement | host accuracy | device accuracy | max abs logit diff "
            "| result |"),
           "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["artifacts"]:
        res = "ok" if r["ok"] else (f"error: {r['error']}" if r["error"] else
                                    f"differs on {r['disagree']} image(s): {r['disagreeing_images']} "
                                    f"(host top-2 margins {', '.join(f'{m:.3g}' for m in r['host_margins'])})")
        out.append(f"| `{r['artifact']}` | {r['n']} | {_pct(r['agreement'])} | {_pct(r['host_accuracy'])} | "
                   f"{_pct(r['device_accuracy'])} | {_diff(r['max_abs_diff'])} | {res.replace('|', '/')} |")
    out += ["", f"- {_env_line('host', report['host'])}", f"- {_env_line('device', report['device'])}",
            "- emulated timings mean nothing, so none are reported; this compares outputs only", "",
            "**All artifacts agree on top-1.**" if report["ok"] else "**NOT all artifacts agree on top-1.**", ""]
    return "\n".join(out)


def compare(args) -> int:
    report = compare_dirs(Path(args.dir), host=args.host, device=args.device)
    print(render_text(report))
    if args.json:
        _write_json(Path(args.json), report)
    if args.markdown:
        p = Path(args.markdown)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(render_markdown(report))
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------- CLI

def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="device_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="host: inputs, copies of the artifacts, host logits, manifest")
    pp.add_argument("--out", required=True, help="the check folder to write")
    pp.add_argument("--data", help="dataset for every file (default: each file's metadata)")
    pp.add_argument("--data-dir", help="where datasets are looked up")
    pp.add_argument("--limit", type=_positive, help="first N test images only")
    pp.add_argument("--threads", type=_positive, default=1, help="runtime threads (default 1)")
    pp.add_argument("--batch-size", type=_positive, default=32)
    pp.add_argument("files", nargs="+", metavar="FILE", help="artifacts the runtime loads (.onnx, .tflite, packed .onnx.esq / .tflite.esq)")
    pr = sub.add_parser("run", help="device: logits of every artifact in the manifest")
    pr.add_argument("--dir", required=True, help="the folder prepare wrote")
    pr.add_argument("--out", default="device", help="subfolder of --dir for the logits (default device)")
    pr.add_argument("--threads", type=_positive, default=None, help="default: the manifest's")
    pr.add_argument("--batch-size", type=_positive, default=None, help="default: the manifest's")
    pr.add_argument("--require-no-torch", action="store_true", help="exit 1 if torch got imported")
    pc = sub.add_parser("compare", help="host vs device, per artifact")
    pc.add_argument("--dir", required=True)
    pc.add_argument("--host", default=HOST_DIR, help="subfolder with the host logits (default host)")
    pc.add_argument("--device", default="device", help="subfolder with the device logits (default device)")
    pc.add_argument("--json", help="write the comparison as JSON here")
    pc.add_argument("--markdown", help="write the table as Markdown here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 for --help
        return int(exc.code or 0)
    try:
        return {"prepare": prepare, "run": run, "compare": compare}[args.cmd](args)
    except BadInput as exc:
        print(f"device_check {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
