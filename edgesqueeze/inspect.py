"""``edgesqueeze inspect``: what any model file holds, in one shape for all four kinds.

``.onnx`` and ``.tflite`` are described by :mod:`edgesqueeze.runtime.inspect` (torch-free);
``.esq`` from its header alone (no decoding: shapes, encodings, codebook sizes, coded bytes);
``.pt`` through the safe checkpoint loader. Every description has the keys ``file``,
``kind``, ``bytes``, ``inputs``, ``outputs``, ``ops``, ``tensors`` and ``metadata``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesqueeze.errors import FormatError


def inspect_file(path: str | Path, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model_args``: how to read a ``.pt`` that does not describe itself (``load_model``)."""
    from edgesqueeze.verify import sniff

    from edgesqueeze._io import not_a_file

    path = Path(path)
    why = not_a_file(path)
    if why:
        raise FormatError(f"{path}: {why}")
    kind = sniff(path)
    if kind == "esq":
        return _inspect_esq(path)
    if kind == "pt":
        return _inspect_pt(path, model_args)
    if kind == "onnx" and path.suffix.lower() in (".pt", ".pth", ".pt2", ".ckpt", ".bin"):
        # named as a PyTorch file and no header of one: say that, not "protobuf parsing failed"
        from edgesqueeze.checkpoint import not_torch_file

        with open(path, "rb") as fh:
            not_torch_file(path, fh.read(64))
    from edgesqueeze.runtime.inspect import inspect_artifact

    desc = inspect_artifact(path)
    return {"file": str(path), "bytes": desc.get("file_bytes", path.stat().st_size), **desc}


def _itemsize(dtype: str) -> int | None:
    """Bytes per element of a raw-section dtype name (numpy knows them all; None otherwise)."""
    import numpy as np

    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return None


def _inspect_esq(path: Path) -> dict[str, Any]:
    from edgesqueeze.format import container

    arc = container.read_esq(path)
    tensors = []
    for name, (blob, info) in arc.sections.items():
        if info.get("enc") == "raw":
            for tname, dtype, shape, *stored in info.get("tensors", []):
                n = 1
                for d in shape:
                    n *= d
                kept = stored[0] if stored else dtype  # a float32 tensor can be stored as float16
                size = _itemsize(kept)
                tensors.append({"name": tname, "dtype": dtype, "shape": shape,
                                "encoding": "raw" if kept == dtype else f"raw, stored as {kept}",
                                "elements": n, "bytes": None if size is None else n * size})
            continue
        shape = info.get("shape", [])
        n = 1
        for d in shape:
            n *= d
        nonzero = info.get("n", 0) if info.get("w") else None
        tensors.append({"name": name, "dtype": "float32", "shape": shape,
                        "encoding": "shared, " + ("dense" if not info.get("w") else f"sparse (gap width {info['w']})"),
                        "codebook": info.get("k"), "codebook_dtype": info.get("cb"), "elements": n,
                        "sparsity": None if nonzero is None or not n else round(1 - nonzero / n, 4),
                        "bytes": len(blob)})
    meta = arc.meta
    shape = meta.get("input_shape")
    return {"file": str(path), "kind": "esq", "bytes": path.stat().st_size, "format_version": arc.version,
            "inputs": [{"name": "input", "shape": [None, *shape] if shape else None, "dtype": "float32"}],
            "outputs": [{"name": "logits", "shape": [None, len(meta["classes"])] if meta.get("classes") else None,
                         "dtype": "float32"}],
            "ops": {}, "tensors": tensors, "metadata": meta}


def _inspect_pt(path: Path, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.models import count_macs

    loaded = load_model(path, **(model_args or {}))
    meta = loaded.meta
    tensors = []
    for name, t in loaded.model.state_dict().items():
        tensors.append({"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                        "bytes": t.numel() * t.element_size(),
                        "sparsity": round(float((t == 0).float().mean()), 4) if t.is_floating_point() and t.numel()
                        else None})
    ops = _ops(loaded)
    from edgesqueeze.models.registry import registered_input_shape

    shape = meta.get("input_shape") or _program_input_shape(loaded) or registered_input_shape(
        meta.get("arch"), meta.get("arch_kwargs"))
    classes = len(meta["classes"]) if meta.get("classes") else None
    if shape and classes is None:  # what the model outputs, from one zero image
        from edgesqueeze.models.probe import check_fits

        try:
            classes = check_fits(loaded.model, shape, source=path)
        except Exception:  # noqa: BLE001 - an extra: an unknown output shape stays unknown
            classes = None
    out = {"file": str(path), "kind": loaded.kind, "bytes": path.stat().st_size,
           "inputs": [{"name": "input", "shape": [None, *shape] if shape else None, "dtype": "float32"}],
           "outputs": [{"name": "logits", "shape": [None, classes] if classes else None, "dtype": "float32"}],
           "ops": ops, "tensors": tensors, "metadata": {k: v for k, v in meta.items() if k != "history"}}
    if not shape:
        out["note"] = "the file does not record its input shape; --input-shape C,H,W gives it (and the output's)"
    batch = _program_batch(loaded)
    if batch is not None:  # None in "shape" is edgesqueeze's reading, which re-traces it at any batch
        static = (f"exported for batch {batch} (a static batch): torch.export.load(...).module() runs it at "
                  f"that batch only; edgesqueeze runs it at any batch")
        out["note"] = f"{out['note']}; {static}" if out.get("note") else static
    if shape:
        try:
            model = loaded.model
            if loaded.kind in ("torchscript", "exported_program"):  # real conv modules for the hooks
                from edgesqueeze.models.program import lifted_module

                model = lifted_module(model, shape, what=str(path))
            out["macs"] = count_macs(model, [int(d) for d in shape])
        except Exception:  # noqa: BLE001 - an extra, not worth failing inspect over
            pass
    return out


def _ops(loaded) -> dict[str, int]:
    """Layer kinds and their counts: the leaf modules' classes (a TorchScript module's own
    class names, not RecursiveScriptModule), or a torch.export program's aten operators."""
    import torch

    program = loaded.source_program
    ops: dict[str, int] = {}
    if isinstance(program, torch.export.ExportedProgram):
        for node in program.graph.nodes:
            if node.op == "call_function" and hasattr(node.target, "_overloadpacket"):
                name = node.target._overloadpacket.__name__  # aten.convolution.default -> convolution
                ops[name] = ops.get(name, 0) + 1
        return ops
    for m in loaded.model.modules():
        if not list(m.children()):
            name = getattr(m, "original_name", None) or type(m).__name__  # ScriptModules keep their class name
            ops[name] = ops.get(name, 0) + 1
    return ops


def _program_batch(loaded) -> int | None:
    """A torch.export program's batch size where it is static (None where it is symbolic, or
    the file is not such a program)."""
    import torch

    program = loaded.source_program
    if not isinstance(program, torch.export.ExportedProgram):
        return None
    user = set(program.graph_signature.user_inputs)
    val = next((n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user), None)
    dims = list(getattr(val, "shape", []))
    return int(dims[0]) if dims and isinstance(dims[0], int) else None


def _program_input_shape(loaded) -> list[int] | None:
    """A torch.export program's first input, less its batch dimension (None where a dimension
    other than the batch is symbolic, or the file is not such a program)."""
    from edgesqueeze.models.program import program_input_shape

    return program_input_shape(loaded.source_program)


def summary_lines(desc: dict[str, Any], *, max_tensors: int = 60) -> list[str]:
    """A terminal rendering of a description."""
    version = f" (format version {desc['format_version']})" if "format_version" in desc else ""
    micro = " (TensorFlow Lite Micro)" if desc.get("arena_bytes") else ""  # it read as a plain tflite
    lines = [f"{desc['file']}: {desc['kind']}{micro}{version}, {desc['bytes']:,} bytes"]
    if desc.get("checksum") and not desc.get("packed"):
        lines[0] += f"; checksum recorded at export: {desc['checksum']}"
    if desc.get("packed"):
        p = desc["packed"]
        lines[0] = (f"{desc['file']}: packed {p['format']}, {desc['bytes']:,} bytes, holding {p['name']} "
                    f"({p['bytes']:,} bytes, {100 * p['ratio']:.1f}%; SHA-256 {p['sha256'][:12]}... checked)")
        if "coded_tensors" in p:
            lines.append(f"  packed {p['coded_tensors']} coded tensors ({p['requantized']} requantized on the device, "
                         f"{p['derived_scales']} with derived scales"
                         + (f", {p['space_to_depth']} rearranged for a space-to-depth input" if p.get("space_to_depth") else "")
                         + f"), {p['products']} products; skeleton "
                         f"{p['skeleton_bytes']:,} B ({p['skeleton_codec']}) for {p['skeleton_restored_bytes']:,} B")
    for key in ("inputs", "outputs"):
        for io in desc.get(key) or []:
            q = f", quantization {io['quantization']}" if io.get("quantization") else ""
            shape = io.get("shape")
            lines.append(f"  {key[:-1]:<6} {io.get('name')}: {io.get('dtype')} "
                         f"{'shape not recorded' if shape is None else shape}{q}")
    if desc.get("note"):
        lines.append(f"  note   {desc['note']}")
    if desc.get("macs"):
        lines.append(f"  MACs   {desc['macs']:,}")
    if desc.get("arena_bytes"):  # a TensorFlow Lite Micro file: RAM beside its flash (the JSON had it alone)
        lines.append(f"  arena  {desc['arena_bytes']:,} bytes of RAM in TensorFlow Lite Micro's interpreter "
                     f"(flash: the file's {desc['bytes']:,} bytes)")
    if desc.get("ops"):
        lines.append("  ops    " + ", ".join(f"{k} x{v}" for k, v in sorted(desc["ops"].items(), key=lambda kv: -kv[1])))
    tensors = desc.get("tensors") or []
    if tensors:
        lines.append(f"  tensors ({len(tensors)}):")
        for t in tensors[:max_tensors]:
            extra = []
            if t.get("encoding"):
                extra.append(t["encoding"])
            if t.get("codebook"):
                extra.append(f"{t['codebook']} centroids ({t.get('codebook_dtype')})")
            if t.get("sparsity") is not None:
                extra.append(f"sparsity {100 * t['sparsity']:.1f}%")
            size = "" if t.get("bytes") is None else f"{t['bytes']:,} B"
            lines.append(f"    {t['name']:<40} {str(t.get('dtype')):<8} {str(t.get('shape')):<20} {size:>12}  "
                         + ", ".join(extra))
        if len(tensors) > max_tensors:
            lines.append(f"    ... {len(tensors) - max_tensors} more (--json shows all)")
    meta = desc.get("metadata") or {}
    if meta:
        lines.append("  metadata:")
        for k, v in meta.items():
            text = str(v)
            lines.append(f"    {k}: {text if len(text) <= 100 else text[:97] + '...'}")
    return lines
