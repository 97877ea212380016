"""TFLite INT8 quantization before conversion: PT2E observers, the quantizer that annotates
the graph (float layers, the pool's own range, shared concatenation ranges), calibration
(:func:`quantize_pt2e`) and bias correction. Why each is needed: :mod:`edgesqueeze.export.tflite`."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesqueeze.errors import ExportError
from edgesqueeze.export._common import check_float_layers, under
from edgesqueeze.export._common import first_line as _first_line
from edgesqueeze.export.tflite_flatbuffer import schema


# ---------------------------------------------------------------------------------------
# INT8: observers, quantizer, calibration data, cross-layer equalization


def _percentile_observer():
    from torchao.quantization.pt2e.observer import HistogramObserver

    class PercentileObserver(HistogramObserver):
        """HistogramObserver's histogram, but the range is the [100 - p, p] percentiles
        (both tails; zero stays representable) instead of the L2-optimal search."""

        def __init__(self, *args: Any, percentile: float = 99.999, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = float(percentile)

        def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
            hist = self.histogram.double()
            cdf = torch.cumsum(hist, 0) / hist.sum().clamp_min(1e-12)
            q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
            lo, hi = (int(i) for i in torch.searchsorted(cdf, q).clamp(0, self.bins - 1))
            width = (self.max_val - self.min_val) / self.bins
            return self.min_val + width * lo, self.min_val + width * (hi + 1)

    return PercentileObserver


def _quant_config(method: str, percentile: float, per_channel: bool):
    """litert-torch's symmetric static config with the activation observer ``method`` picks."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e.observer import HistogramObserver, MinMaxObserver

    config = pq.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=False)
    eps = 2 ** -12  # litert-torch's choice
    if method == "minmax":
        ctr = MinMaxObserver.with_args(eps=eps)
    elif method in ("entropy", "mse"):  # torch's histogram observer minimizes the L2 error
        ctr = HistogramObserver.with_args(eps=eps)
    elif method == "percentile":
        ctr = _percentile_observer().with_args(eps=eps, percentile=percentile)
    else:
        raise ExportError(f"calibration.method: unknown method {method!r}; choose minmax, "
                          "entropy, percentile or mse")
    act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=ctr)
    return dataclasses.replace(config, input_activation=act, output_activation=act)


_POOLS = ("aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default", "aten.mean.dim")


def _quantizer(config, float_layers: Sequence[str], requantize_pool: bool = False):
    """A PT2EQuantizer whose ops from the modules in ``float_layers`` (or below them) stay
    float; with ``requantize_pool``, global average pools get their own output range instead
    of sharing their input's (averaging shrinks the range: SqueezeNet 1.0's pooled logits span
    [0, 46] but inherit the [0, 373] range of the conv before, 53 int8 levels for 1000 logits)."""
    from litert_torch.quantize import pt2e_quantizer_utils as qu
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        SharedQuantizationSpec,
    )

    keep = _not_in(tuple(float_layers))

    class Quantizer(PT2EQuantizer):
        def transform_for_annotation(self, model):
            model = super().transform_for_annotation(model)
            _one_weight_node_per_layer_call(model)
            return model

        def annotate(self, model):
            # PT2EQuantizer.annotate, with the float-layer filter applied to the propagation
            # to pass-through ops too (its own propagation would quantize a float pool)
            self._annotate_all_static_patterns(model, self.global_config, keep)
            for n in model.graph.nodes:
                if n.op != "call_function" or not keep(n):
                    continue
                ann = n.meta.get("quantization_annotation")
                if requantize_pool and str(n.target) in _POOLS and ann is not None:
                    ann.output_qspec = self.global_config.output_activation
                    continue
                prev = n.args[0] if n.args else None
                prev_ann = getattr(prev, "meta", {}).get("quantization_annotation")
                if (not qu._is_share_obs_or_fq_op(n.target) or prev_ann is None
                        or prev_ann.output_qspec is None or (ann is not None and ann._annotated)):
                    continue
                shared = SharedQuantizationSpec(prev)
                n.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={prev: shared}, output_qspec=shared, _annotated=True)
                if requantize_pool and str(n.target) in _POOLS:
                    n.meta["quantization_annotation"].output_qspec = self.global_config.output_activation
            _share_concat_ranges(model, keep, SharedQuantizationSpec)
            return model

    return Quantizer().set_global(config)


_WEIGHTED = ("conv1d", "conv2d", "convolution", "linear")


def _one_weight_node_per_layer_call(gm) -> None:
    """Give each call of a layer that is applied more than once (``x = conv(conv(x))``) its own
    node reading the same weight. The quantizer's patterns take the weight node into their
    partition and skip a conv whose partition is already annotated, so every call after the
    first of a shared weight stayed float in the tflite-int8 file: a dequantize, a float
    conv, a quantize and the float weights (4x their int8 bytes) in a file meant to be int8."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        users = [u for u in node.users if u.op == "call_function"
                 and getattr(getattr(u.target, "_overloadpacket", None), "__name__", "") in _WEIGHTED]
        for user in users[1:]:
            _feed_a_twin(gm, node, user, lambda n: gm.graph.get_attr(n.target))
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _feed_a_twin(gm, node, user, make) -> None:
    """Give ``user`` its own copy of ``node`` (``make(node)``, inserted after it, with its meta)."""
    with gm.graph.inserting_after(node):
        twin = make(node)
    twin.meta = dict(node.meta)
    user.replace_input_with(node, twin)


def _share_concat_ranges(model, keep: Callable[[Any], bool], shared_spec) -> None:
    """One int8 range for a channel concatenation *and the ops that produce its inputs*.

    litert-torch's ``cat`` annotator finds concatenations by their source partition, which
    the non-strict ``torch.export`` graph does not carry: the ``cat`` stays unannotated, so
    the PT2E simulation concatenates in float (each branch in its own range), while the
    converter writes an int8 CONCATENATION in the *first* input's range ("Missing
    quantization parameter on the output") and clips the other branches to it. On the CIFAR
    tiny SqueezeNet, expand3x3 outputs up to 6.4 were clipped at 3.2 (expand1x1's range) in
    every Fire whose expand3x3 spans more, and the file agreed with the float model on 92%
    of validation images while its simulation agreed on 99%. Here the first producer's
    observer is shared with the other producers (each of which feeds only the
    concatenation) and with the concatenation's output: one range that covers every branch,
    in the simulation and in the file alike, and nothing is requantized.
    """
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    import torch.fx

    for n in model.graph.nodes:
        if n.op != "call_function" or n.target != torch.ops.aten.cat.default or not keep(n):
            continue
        ins = n.args[0] if n.args else ()
        if len(ins) < 2 or not all(isinstance(a, torch.fx.Node) for a in ins):
            continue
        anns = [a.meta.get("quantization_annotation") for a in ins]
        if (any(x is None or x.output_qspec is None for x in anns)
                or any(len(a.users) != 1 for a in ins[1:]) or len(set(ins)) != len(ins)):
            continue
        first = shared_spec(ins[0])
        for x in anns[1:]:
            x.output_qspec = first
        n.meta["quantization_annotation"] = QuantizationAnnotation(
            input_qspec_map={a: first for a in ins}, output_qspec=first, _annotated=True)


def _not_in(names: tuple[str, ...]) -> Callable[[Any], bool]:
    def keep(node) -> bool:
        paths = [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]
        return not any(under(p, names) for p in paths)

    return keep


def check_converted_float_layers(model: nn.Module, float_layers: Sequence[str], converted) -> None:
    """The converter re-quantizes a float conv that sits alone between int8 ops (it fuses
    DEQUANTIZE -> conv -> QUANTIZE into an int8 conv). Float regions that reach the graph's
    input or output stay float, and so does a region of two or more convs in a row (a whole
    Fire module: its squeeze feeds float expands). Count the float convs in the file."""
    fb, fbu = schema()
    kinds = (nn.Conv2d, nn.Linear)
    wanted = sum(isinstance(m, kinds) for n, m in model.named_modules()
                 if under(n, float_layers))
    sg = converted.subgraphs[0]
    heavy = {fb.BuiltinOperator.CONV_2D, fb.BuiltinOperator.DEPTHWISE_CONV_2D,
             fb.BuiltinOperator.FULLY_CONNECTED}
    float_ops = [op for op in sg.operators
                 if fbu.get_builtin_code_from_operator_code(converted.operatorCodes[op.opcodeIndex]) in heavy
                 and sg.tensors[op.inputs[0]].type == fb.TensorType.FLOAT32]
    floats = len(float_ops)
    if floats > wanted:  # layers the quantizer did not annotate (a bare matmul, an uneven "same" pad)
        import warnings

        from edgesqueeze.errors import Note

        names = [_tensor_name(sg.tensors[op.inputs[1]]) for op in float_ops if len(op.inputs) > 1]
        weights = sum(int(np.prod(sg.tensors[op.inputs[1]].shape)) * 4 for op in float_ops if len(op.inputs) > 1)
        warnings.warn(f"tflite-int8: {floats - wanted} conv/linear op(s) of the file compute in float32 that "
                      f"float_layers does not name ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}; "
                      f"{weights:,} B of float weights among the file's float ops): litert-torch's quantizer does not "
                      "take them (a matmul with a bare parameter, a conv padded unevenly); an nn.Linear / nn.Conv2d "
                      "with numeric padding is quantized", Note, stacklevel=2)
    if not wanted:
        return
    if floats < wanted:
        raise ExportError(f"tflite-int8: float_layers {', '.join(float_layers)}: the file has {floats} float "
                          f"conv/linear ops where {wanted} were asked for; LiteRT's converter re-quantizes a "
                          "lone float conv between int8 layers. Keep float a block of two or more convs in a "
                          "row (a whole Fire module) or a region that reaches the input or the output (the "
                          "first conv, or the layers from the last conv on)")


def _tensor_name(t) -> str:
    name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else str(t.name)
    return name.rsplit(";", 1)[-1] or "?"


def _activation_observers(gm) -> dict[str, Any]:
    """The activation observers of a prepared PT2E graph by module name (those that observe a
    computed tensor, not a weight or bias constant)."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and "activation_post_process" in str(n.target):
            if getattr(n.args[0] if n.args else None, "op", None) != "get_attr":
                out[str(n.target)] = gm.get_submodule(str(n.target))
    return out


def quantize_pt2e(model: nn.Module, calib: torch.Tensor, *, method: str = "entropy",
                  percentile: float = 99.999, batch_size: int = 32,
                  float_layers: Sequence[str] = (), per_channel: bool = True,
                  requantize_pool: bool = False, ranges_from: nn.Module | None = None,
                  correct_toward: nn.Module | None = None, ranges_toward: nn.Module | None = None):
    """Calibrated PT2E int8 model (a GraphModule of quantize/dequantize + float ops that
    simulates the int8 file in torch) and the quantizer that made it.

    ``calib`` is float model input (N, C, H, W). ``method``: ``minmax`` (observed range),
    ``entropy`` (torch's HistogramObserver: the range minimising L2 quantization error over a
    2048-bin histogram, litert-torch's default; PyTorch's analogue of entropy calibration,
    not KL), ``percentile`` (clip both tails at ``percentile``). Weights: symmetric int8,
    per output channel if ``per_channel``. ``float_layers``: module names left in float.
    ``ranges_from``: a model computing the same function with the same graph of quantized
    tensors (the model before a space-to-depth stem rewrite): its activation ranges, observed on
    ``calib``, replace ``model``'s, so that both files quantize every activation alike instead
    of on float sums taken in another order (``model`` then sees one image, for its weights).
    If the two graphs' activation observers do not line up, ``model`` is calibrated itself.
    ``correct_toward``: bias correction (:func:`correct_bias`) toward this float model after
    conversion. With ``ranges_from`` taken over and ``ranges_toward`` given (the float model
    ``ranges_from``'s own graph is corrected toward), the biases are corrected on
    ``ranges_from``'s graph instead and copied conv by conv: the same biases, so the same
    integers in both files (correcting the rewritten graph itself measures float sums taken
    in another order, and a bias an ulp apart can round to another int32).
    """
    if calib.ndim != 4 or len(calib) == 0:
        raise ExportError(f"calibration input must be a non-empty (N, C, H, W) batch, got {tuple(calib.shape)}")
    check_float_layers(model, float_layers)
    # torch.export's module shares parameters with ``model``: copy, so that nothing done to
    # the quantized module (bias correction) leaks into the caller's float model
    model = copy.deepcopy(model).eval()
    config = _quant_config(method, percentile, per_channel)
    quantizer = _quantizer(config, float_layers, requantize_pool)
    what = type(model).__name__
    ref = None
    if ranges_from is not None:  # its activation ranges, observed on all of calib
        ref, _ = _calibrated(copy.deepcopy(ranges_from).eval(), calib,
                             _quantizer(config, float_layers, requantize_pool), batch_size, what)
    gm, took = _calibrated(model, calib, quantizer, batch_size, what, ranges=ref)
    gm = _converted(gm, what)
    if correct_toward is not None:
        twin = None
        if took and ranges_toward is not None:
            twin = correct_bias(_converted(ref, what), ranges_toward, calib)
        if twin is None or not _copy_conv_biases(twin, gm):
            correct_bias(gm, correct_toward, calib)
    return gm, quantizer


def _to_eval(gm) -> None:
    """torchao's ``move_exported_model_to_eval`` of ``gm``, in place, without its work where
    there is none. It rewrites train-mode dropout and batch norm ops into eval ones by pattern,
    tracing its patterns with torch.export anew on every call: six small traces, 0.6 s of a
    digits tflite-int8 export's 7.7 s, twice per export (benchmarks/notes.md, session 44). Our
    graphs are traced from modules in eval mode, so each such op already says
    ``training=False``: then only torchao's flag is set. Any other dropout or batch norm op,
    or another torchao, goes through torchao."""
    from torchao.quantization.pt2e import move_exported_model_to_eval

    try:
        from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR
    except ImportError:  # another torchao: its own way
        move_exported_model_to_eval(gm)
        return
    aten = torch.ops.aten
    for node in gm.graph.nodes:
        name = str(node.target) if node.op == "call_function" else ""
        if "dropout" not in name and "batch_norm" not in name:
            continue
        if node.target is aten.dropout.default:  # (input, p, train)
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        elif node.target is aten.batch_norm.default:  # (input, weight, bias, mean, var, training, ...)
            train = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", True)
        else:
            train = True  # an op this check does not read: torchao decides
        if train is not False:
            move_exported_model_to_eval(gm)
            return
    setattr(gm, _EXPORTED_TRAINING_ATTR, False)


def _converted(gm, what: str):
    """A calibrated PT2E graph converted to quantize/dequantize ops, in eval mode."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    try:
        gm = convert_pt2e(gm, fold_quantize=False)
        _to_eval(gm)
        gm.training = False  # .eval() is disallowed on PT2E modules; litert-torch checks the flag
    except Exception as exc:
        raise ExportError(f"PT2E quantization of {what} failed: {_first_line(exc)}") from exc
    return gm


def _conv_nodes(gm) -> list[tuple[Any, str | None]]:
    """A converted graph's conv nodes in graph order, each with the attribute name of its
    bias (None: a conv without a bias constant)."""
    conv = torch.ops.aten.conv2d.default
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == conv:
            bias = node.args[2] if len(node.args) > 2 else None
            out.append((node, bias.target if getattr(bias, "op", None) == "get_attr" else None))
    return out


def _conv_biases(gm) -> list[torch.Tensor | None]:
    """The bias tensors of a converted graph's convs, in graph order (None: a conv without one)."""
    return [None if target is None else _attr(gm, target) for _, target in _conv_nodes(gm)]


def _copy_conv_biases(src, dst) -> bool:
    """Copy ``src``'s conv biases into ``dst``'s, conv by conv in graph order, if the two
    graphs have the same number of convs with biases of the same shapes; else copy nothing
    and return False."""
    a, b = _conv_biases(src), _conv_biases(dst)
    if len(a) != len(b) or any((x is None) != (y is None) or (x is not None and x.shape != y.shape)
                               for x, y in zip(a, b)):
        return False
    with torch.no_grad():
        for x, y in zip(a, b):
            if x is not None:
                y.copy_(x)
    return True


def _attr(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _folds_batchnorm(node) -> bool:
    """A conv, transposed conv or linear node: what PT2E's prepare folds a BatchNorm after into."""
    from torchao.quantization.pt2e.utils import _is_conv_or_conv_transpose_node

    return _is_conv_or_conv_transpose_node(node) or node.target == torch.ops.aten.linear.default


def _normalizes(user, node) -> bool:
    """Whether graph node ``user`` is a BatchNorm (inference form) of ``node``'s output."""
    return user.target in (torch.ops.aten._native_batch_norm_legit_no_training.default,
                           torch.ops.aten.batch_norm.default) and user.args[0] is node


def _own_conv_call_for_each_batchnorm(gm) -> None:
    """Where a conv's output feeds a BatchNorm and something else (``bn(y) + y``), compute
    the conv once more for the BatchNorm alone. ``prepare_pt2e`` folds the BatchNorm into the
    conv whatever else reads its output, so the other reader got the folded output too (a
    digits test net: 94% top-1 agreement with fp32, logits off by 70% of their range). The
    second call then gets its own weight (:func:`_one_weight_per_conv_call_before_batchnorm`):
    the file stores that conv twice and computes it twice."""
    changed = False
    for conv in list(gm.graph.nodes):
        if conv.op != "call_function" or not _folds_batchnorm(conv) or len(conv.users) < 2:
            continue
        norms = [u for u in conv.users if _normalizes(u, conv)]
        if not norms or len(norms) == len(conv.users):
            continue
        for bn in norms:
            _feed_a_twin(gm, conv, bn, lambda n: gm.graph.call_function(n.target, tuple(n.args), dict(n.kwargs)))
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _one_weight_per_conv_call_before_batchnorm(gm) -> None:
    """Give each call of a conv that is applied more than once, where at least one call is
    followed by a BatchNorm, its own copy of the weight and bias constants.

    ``prepare_pt2e`` folds every conv -> BatchNorm pair into the conv's weight and bias
    constants (torchao's ``_fuse_conv_bn_``). With one weight shared by two calls, it folds the
    first call's BatchNorm into it and drops every later call's BatchNorm without folding it
    (bnb(c(x)) became c(x) folded with bna), and a conv without a bias gets one bias constant
    named after the weight that the later call overwrites with zeros: the tflite-int8 file of a
    digits net with ``bna(c(x))`` then ``bnb(c(x))`` scored 11% where its float model scores 91%.
    Each call now folds its own BatchNorm into its own copy, so the file stores the (int8)
    weight once per call. A conv applied twice with no BatchNorm after it keeps one weight
    (:func:`_one_weight_node_per_layer_call`)."""
    by_weight: dict[str, list[Any]] = {}
    for n in gm.graph.nodes:
        w = n.args[1] if n.op == "call_function" and len(n.args) > 1 else None
        if getattr(w, "op", None) == "get_attr" and _folds_batchnorm(n):
            by_weight.setdefault(str(w.target), []).append(n)
    changed = False
    for convs in by_weight.values():
        if len(convs) < 2 or not any(_normalizes(u, c) for c in convs for u in c.users):
            continue
        for i, conv in enumerate(convs[1:], 1):
            args = list(conv.args)
            for k in (1, 2):
                const = args[k] if len(args) > k else None
                if getattr(const, "op", None) != "get_attr":
                    continue
                tensor = _attr(gm, str(const.target))
                name = f"{str(const.target).replace('.', '_')}_call{i}"
                while hasattr(gm, name):
                    name += "_"
                if isinstance(tensor, nn.Parameter):
                    gm.register_parameter(name, nn.Parameter(tensor.detach().clone(), tensor.requires_grad))
                else:
                    gm.register_buffer(name, tensor.detach().clone())
                with gm.graph.inserting_before(conv):
                    twin = gm.graph.get_attr(name)
                twin.meta = dict(const.meta)
                args[k] = twin
            conv.args = tuple(args)
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()


def _calibrated(model: nn.Module, calib: torch.Tensor, quantizer, batch_size: int, what: str, ranges=None):
    """``model`` exported, prepared with ``quantizer`` and calibrated on ``calib`` (a PT2E
    graph with observers) and whether ``ranges`` was taken over: another calibrated graph
    whose activation observers are taken over when they line up with this one's (then this
    one sees one image only)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    try:  # a dynamic batch lets calibration run in batches; fall back to one image at a time
        example = calib[:1].repeat(2, 1, 1, 1)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        gm = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False).module()
    except Exception:  # noqa: BLE001 - no dynamic batch for this model: calibrate one by one
        batch_size = 1
        try:
            gm = torch.export.export(model, (calib[:1],), strict=False).module()
        except Exception as exc:
            raise ExportError(f"torch.export cannot trace {what} for INT8 calibration: "
                              f"{_first_line(exc)}") from exc
    try:
        _own_conv_call_for_each_batchnorm(gm)
        _one_weight_per_conv_call_before_batchnorm(gm)
        gm = prepare_pt2e(gm, quantizer)
        _to_eval(gm)
        theirs, ours = (_activation_observers(ranges), _activation_observers(gm)) if ranges is not None else ({}, {})
        took = bool(theirs) and theirs.keys() == ours.keys() and all(type(theirs[k]) is type(ours[k]) for k in ours)
        with torch.no_grad():
            if took:
                gm(calib[:1])  # every observer sees something (the weights'), then the ranges are taken over
                for k, obs in ours.items():
                    obs.load_state_dict(theirs[k].state_dict())
            else:
                for i in range(0, len(calib), batch_size):
                    gm(calib[i:i + batch_size])
    except Exception as exc:
        raise ExportError(f"PT2E quantization of {what} failed: {_first_line(exc)}") from exc
    return gm, took


def correct_bias(gm, model: nn.Module, calib: torch.Tensor, *, max_images: int = 64):
    """Empirical bias correction of a calibrated PT2E model ``gm``, in place; returns it.

    Quantization (rounding, and the clipping of a tight activation range) shifts the mean of
    each conv's output. Going through the convs in graph order, add to each bias (per output
    channel) the mean over images and positions of float output minus quantized output,
    measured with every earlier conv already corrected: correcting all at once overshoots,
    since a layer's shift is partly inherited from the layers before it. One pass over
    ``calib[:max_images]`` held as one batch (memory: that many images' activations).
    """
    from edgesqueeze.models.fold import conv_bn_pairs, fold_batchnorm
    from edgesqueeze.errors import ModelError

    tied: dict[str, list[str]] = {}
    try:  # PT2E folds BatchNorm into the conv: the float target is the folded conv's output
        model = fold_batchnorm(model, conv_bn_pairs(model, tied=tied)).eval()
    except ModelError as exc:
        raise ExportError(f"bias correction: {exc}") from None
    # a conv whose BatchNorm stays unfolded here (the conv or the BN is applied more than once,
    # as one BN after two convs) has no float target for the output PT2E folded: left as it is
    modules = {n: m for n, m in model.named_modules() if n not in tied}
    calib = calib[:max_images]
    targets = {}
    paths = []
    for node, bias in _conv_nodes(gm):
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else None
        paths.append(path)
        if path in modules and bias is not None:
            targets[node] = (path, bias)
    # a conv called more than once: its module's hook sees only the last call, and its
    # BatchNorms stay unfolded in ``model`` (a call's own BN is folded in ``gm``): no target
    targets = {n: pb for n, pb in targets.items() if paths.count(pb[0]) == 1}
    if not targets:
        return gm

    want: dict[str, torch.Tensor] = {}
    hooks = [modules[p].register_forward_hook(
        lambda mod, inp, out, p=p: want.__setitem__(p, out.detach().double().mean((0, 2, 3))))
        for p in {p for p, _ in targets.values()}]
    try:
        with torch.no_grad():
            model(calib)
    finally:
        for h in hooks:
            h.remove()

    class Correct(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in targets:
                path, target = targets[n]
                delta = (want[path] - out.detach().double().mean((0, 2, 3))).to(out.dtype)
                bias = _attr(gm, target)
                bias.add_(delta.to(bias.dtype))
                out = out + delta.view(1, -1, 1, 1)  # what the corrected conv now outputs
            return out

    with torch.no_grad():
        Correct(gm).run(calib)
    return gm
