"""Rewrite an ONNX graph's 1-D convolutions as 2-D ones of unit height.

Why: ONNX Runtime's CPU provider runs a 2-D ``Conv`` through its NCHWc
layout transformer (channels blocked by the SIMD width, MLAS's direct NCHWc
kernels, the activation fused), which handles two spatial dimensions only;
a 1-D ``Conv`` stays on the generic im2col + SGEMM path. On the reference
``cnn1d`` at batch 32 the 2-D form's convolutions are 3x faster (the whole
fp32 model 1.9x), and they get 2.9x cheaper for the 3.9x fewer MACs of 50%
channel pruning where the 1-D ones got 2.4x (BENCHMARKS.md, "The 1-D CNN
exported as 2-D convolutions"). A convolution over ``(N, C, L)`` with a
``(k,)`` kernel computes exactly what one over ``(N, C, 1, L)`` with a
``(1, k)`` kernel computes, so the logits do not change.

1. Each ``Conv`` whose weight is a rank-3 initializer gets a rank-4 weight
   ``(O, I, 1, k)`` and 2-D attributes (``kernel_shape [1, k]``, ``strides
   [1, s]``, ``dilations [1, d]``, ``pads [0, b, 0, e]``); an ``Unsqueeze``
   (axis 2) feeds it and a ``Squeeze`` (axis 2) restores its 3-D output.
2. Each such ``Squeeze`` moves below the element-wise or per-channel ops it
   feeds alone (``Relu``, ``BatchNormalization``, ...), so ONNX Runtime can
   still fuse them into the convolution.
3. A ``Squeeze`` followed by an ``Unsqueeze`` on the same axis cancels, so
   consecutive convolutions stay 4-D; a ``Reshape`` to a constant shape (or a
   ``Flatten`` at axis 0-2) reads the 4-D tensor directly, the element
   order being the same.

Tensor names keep their meaning (a 3-D tensor stays 3-D under its name; the
4-D ones are new names), so the exporter's shape annotations stay valid.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Ops that act element-wise or per channel (axis 1) on their first input and
# whose other inputs do not depend on the rank: a unit axis 2 passes through.
# (PRelu is not: its slope broadcasts against the trailing axes.)
RANK_FREE = {"Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
             "Softplus", "Softsign", "Gelu", "Mish", "Clip", "Abs", "Neg", "Identity", "BatchNormalization"}
AXIS = 2


def conv1d_as_conv2d(model: onnx.ModelProto) -> int:
    """Rewrite ``model``'s main graph in place; return how many 1-D ``Conv`` nodes became 2-D."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    initializers = {t.name: t for t in graph.initializer}
    # Left alone: graphs with subgraphs (If / Loop / Scan bodies may read tensors this renames)
    # and weights that are also graph inputs (IR < 4: their declared 3-D types would stay).
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute) \
            or any(i.name in initializers for i in graph.input):
        return 0
    original = [copy.deepcopy(n) for n in graph.node]  # detached: the node list is rebuilt below
    consumers = _consumers(original)
    convs = [n for n in original if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in initializers
             and len(initializers[n.input[1]].dims) == 3
             and all(c.op_type == "Conv" and list(c.input).index(n.input[1]) == 1 for c in consumers[n.input[1]])]
    if not convs:
        return 0
    if opset < 13:  # axes became an input in opset 13
        raise ValueError(f"conv1d_as_conv2d needs ONNX opset >= 13, the model has {opset}")
    taken = {name for n in graph.node for name in n.output} | set(initializers) | {i.name for i in graph.input}
    fresh = _namer(taken)
    axes = fresh("unit_height_axis")

    rewrite = {id(n) for n in convs}
    reshaped: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    squeezes: list[onnx.NodeProto] = []
    for node in original:
        if id(node) not in rewrite:
            nodes.append(node)
            continue
        weight = initializers[node.input[1]]
        if weight.name not in reshaped:
            dims = list(weight.dims)
            del weight.dims[:]
            weight.dims.extend([*dims[:2], 1, dims[2]])
            reshaped.add(weight.name)
        _to_2d_attributes(node)
        wide_in, wide_out = fresh(node.input[0] + "_2d"), fresh(node.output[0] + "_2d")
        nodes.append(helper.make_node("Unsqueeze", [node.input[0], axes], [wide_in], name=fresh("unsqueeze_2d")))
        squeeze = helper.make_node("Squeeze", [wide_out, axes], [node.output[0]], name=fresh("squeeze_2d"))
        node.input[0], node.output[0] = wide_in, wide_out
        nodes += [node, squeeze]
        squeezes.append(squeeze)

    graph.initializer.append(numpy_helper.from_array(np.array([AXIS], dtype=np.int64), axes))
    nodes = _sink_squeezes(nodes, squeezes, fresh, {o.name for o in graph.output})
    nodes = _cancel_pairs(nodes, axes, initializers, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)
    # Drop annotations of tensors that changed rank (the weights) or no longer exist.
    produced = {name for n in graph.node for name in n.output} | {i.name for i in graph.input}
    kept = [v for v in graph.value_info if v.name not in reshaped and (v.name in produced or v.name in initializers)]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(convs)


def _to_2d_attributes(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name in ("kernel_shape", "strides", "dilations"):
            values = list(attr.ints)
            del attr.ints[:]
            attr.ints.extend([1, *values])
        elif attr.name == "pads":
            begin, end = attr.ints
            del attr.ints[:]
            attr.ints.extend([0, begin, 0, end])


def _sink_squeezes(nodes, squeezes, fresh, outputs):
    """Move each Squeeze below the rank-free ops that are its output's only consumer (step 2)."""
    for squeeze in squeezes:
        while True:
            users = _consumers(nodes)[squeeze.output[0]]
            if squeeze.output[0] in outputs or len(users) != 1:
                break
            user = users[0]
            if user.op_type not in RANK_FREE or list(user.input).count(squeeze.output[0]) != 1 \
                    or user.input[0] != squeeze.output[0] or len(user.output) != 1:
                break
            # squeeze(x4) -> y; user(y) -> z   becomes   user(x4) -> z4; squeeze(z4) -> z
            user.input[0] = squeeze.input[0]
            wide = fresh(user.output[0] + "_2d")
            squeeze.input[0], squeeze.output[0], user.output[0] = wide, user.output[0], wide
            nodes = [n for n in nodes if n is not squeeze]
            nodes.insert(next(i for i, n in enumerate(nodes) if n is user) + 1, squeeze)
    return nodes


def _cancel_pairs(nodes, axes, initializers, outputs):
    """Squeeze -> Unsqueeze on axis 2 cancels; Squeeze -> Reshape / Flatten reads the 4-D tensor (step 3)."""
    squeezed = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Squeeze" and list(n.input[1:]) == [axes]}
    rename: dict[str, str] = {}
    kept = []
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        source = node.input[0] if node.input else ""
        if node.op_type == "Unsqueeze" and list(node.input[1:]) == [axes] and source in squeezed \
                and node.output[0] not in outputs:
            rename[node.output[0]] = squeezed[source]
            continue
        if source in squeezed and _reads_any_rank(node, initializers):
            node.input[0] = squeezed[source]
        kept.append(node)
    used = {name for n in kept for name in n.input} | outputs
    return [n for n in kept if not (n.op_type == "Squeeze" and n.output[0] in squeezed and n.output[0] not in used)]


def _reads_any_rank(node: onnx.NodeProto, initializers) -> bool:
    """Whether ``node`` gives the same result on ``(N, C, 1, L)`` as on ``(N, C, L)``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in initializers:
        shape = numpy_helper.to_array(initializers[node.input[1]])
        return attrs.get("allowzero", 0) == 1 or not (shape == 0).any()  # a 0 copies the input's dimension
    if node.op_type == "Flatten":
        return 0 <= attrs.get("axis", 1) <= AXIS
    return False


def _consumers(nodes) -> defaultdict[str, list[onnx.NodeProto]]:
    users: defaultdict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            users[name].append(node)
    return users


def _namer(taken: set[str]):
    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name
    return fresh
