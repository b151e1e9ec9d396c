"""Cutting a block graph (`llm_<i>`) into pieces of consecutive decoder layers, without loading its weights.

    block_cuts(model, layers)          one cut per layer boundary: the node position where the fewest tensors
                                       are live (the residual sum, rotary cos/sin, the attention mask)
    segment_bytes(model, cuts)         weight bytes of each layer's segment (the first also holds the preamble,
                                       the last the final norm and lm_head)
    plan_pieces(model, layers, groups) -> [Piece]: nodes, stage inputs, interface inputs and outputs per piece
    piece_model(model, piece)          the piece as a ModelProto sharing the block's initializers (external data
                                       still points into the block's .data file)
    interface_shapes(model, shapes)    concrete shapes of every tensor at given input shapes (profiles, buffers)

    block graph (nodes in the exporter's topological order):
      [preamble: cos/sin, mask | layer a ... | cut | layer k ... | cut | ... layer b-1, norm, lm_head]
                                              ^ live here: hidden rows, cos, sin, mask (the "interface")
      piece 0: stage inputs it reads        -> its cache outputs (key_l, value_l) + interface tensors
      piece 1: stage inputs + interface     -> its cache outputs + interface tensors for later pieces ...

Shape-derived tensors (computed from tensor shapes and constants only: Shape, Range over dims, Concat of
dims ...) never cross a cut: each piece recomputes the ones it reads, so no piece takes a shape tensor as an
input (TensorRT engines here take execution tensors only). The graph must have no subgraph attributes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from graphs.errors import ArtifactError

_SHAPE_OPS = ("Shape", "Size")


@dataclass(frozen=True)
class Piece:
    """One engine's share of a block: layers [start, end) of the stage and the graph that computes them."""

    index: int
    layers: tuple[int, int]          # decoder layer indices [start, end)
    nodes: tuple[int, ...]           # positions in the block graph's node list, in order
    inputs: tuple[str, ...]          # stage inputs this piece reads, then interface tensors from earlier pieces
    outputs: tuple[str, ...]         # stage outputs it produces, then interface tensors later pieces read
    interface_in: tuple[str, ...]    # the inputs that are interface tensors
    interface_out: tuple[str, ...]   # the outputs that are interface tensors
    initializers: tuple[str, ...]    # initializer names its nodes read


def _check_flat(graph) -> None:
    from onnx import AttributeProto
    for node in graph.node:
        for a in node.attribute:
            if a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise ArtifactError(f"block graph {graph.name!r} node {node.name!r} ({node.op_type}) has a subgraph; "
                                    "csprt splits flat block graphs only; build the stage as one engine (a larger "
                                    "--max-build-memory, no --max-layers-per-engine)")


def shape_derived(graph) -> set[str]:
    """Tensors computable from tensor shapes and constants alone (recomputed by every piece that reads them).
    Initializers stored as external data do not count as constants here: they are weights, read by one piece."""
    const = {t.name for t in graph.initializer if not _is_external(t)}
    derived = set(const)
    for node in graph.node:
        ins = [i for i in node.input if i]
        if node.op_type in _SHAPE_OPS or all(i in derived for i in ins):
            derived.update(o for o in node.output if o)
    return derived


def _producers(graph) -> dict[str, int]:
    return {o: i for i, n in enumerate(graph.node) for o in n.output if o}


def block_cuts(model, layers: tuple[int, ...]) -> list[int]:
    """For each boundary between consecutive `layers`, the node position after which to cut.

    The cut for the boundary before layer l lies after the nodes writing key/value of layer l-1 and before
    those writing layer l's; within that window it is where the fewest tensors that are not shape-derived
    are live (produced at or before it, read after it), the latest of equals: after the previous layer's residual sum.

    Args:
        model (onnx.ModelProto): the block graph (weights need not be loaded).
        layers (tuple[int, ...]): the stage's decoder layers, in order (their cache outputs key_l, value_l).

    Returns:
        list[int]: len(layers) - 1 node positions, increasing.
    """
    graph = model.graph
    _check_flat(graph)
    prod = _producers(graph)
    derived = shape_derived(graph)
    outputs = {o.name for o in graph.output}
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for t in node.input:
            if t:
                last_use[t] = i
    missing = [f"{kind}_{l}" for l in layers for kind in ("key", "value") if f"{kind}_{l}" not in prod]
    if missing:
        raise ArtifactError(f"block graph {graph.name!r} writes no {', '.join(missing)}; it is not a csprt block "
                            "graph of these layers; re-export the artifact")
    n = len(graph.node)
    live = [0] * (n + 1)  # live[i]: tensors live across a cut after node i
    for t, p in prod.items():
        end = last_use.get(t, -1)
        if t in derived or t in outputs and end <= p:
            continue
        if end > p:
            live[p] += 1
            live[end] -= 1
    for i in range(1, n + 1):
        live[i] += live[i - 1]
    cuts = []
    for prev, nxt in zip(layers, layers[1:]):
        lo = max(prod[f"key_{prev}"], prod[f"value_{prev}"])
        hi = min(prod[f"key_{nxt}"], prod[f"value_{nxt}"])
        if hi <= lo:
            raise ArtifactError(f"block graph {graph.name!r}: layer {nxt}'s cache is written before layer {prev}'s "
                                "is done; csprt cannot cut it at this boundary")
        cuts.append(min(range(lo, hi), key=lambda i: (live[i], -i)))  # ties: the latest (after the residual sum)
    return cuts


def segments(model, cuts: list[int]) -> list[range]:
    """Node positions of each layer's segment: (previous cut, this cut]; the first from 0, the last to the end."""
    bounds = [-1, *cuts, len(model.graph.node) - 1]
    return [range(a + 1, b + 1) for a, b in zip(bounds, bounds[1:])]


def segment_bytes(model, cuts: list[int]) -> list[int]:
    """Bytes of the initializers each segment's nodes read (a shared initializer counts in each segment)."""
    from graphs.onnx_passes import tensor_bytes

    size = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    out = []
    for seg in segments(model, cuts):
        names = {i for p in seg for i in model.graph.node[p].input if i in size}
        out.append(sum(size[n] for n in names))
    return out


def plan_pieces(model, layers: tuple[int, ...], groups: list[tuple[int, int]], cuts: list[int] | None = None
                ) -> list[Piece]:
    """The pieces for `groups` of consecutive layer segments.

    Args:
        model (onnx.ModelProto): the block graph.
        layers (tuple[int, ...]): the stage's decoder layers.
        groups (list[tuple[int, int]]): [(first, end)) segment index ranges covering 0..len(layers), in order.
        cuts (list[int] | None): from `block_cuts`. Defaults to None (computed).

    Returns:
        list[Piece]: in order; chained, they compute the block's outputs.
    """
    graph = model.graph
    cuts = block_cuts(model, layers) if cuts is None else cuts
    segs = segments(model, cuts)
    prod = _producers(graph)
    derived = shape_derived(graph)
    inits = {t.name for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    graph_outputs = [o.name for o in graph.output]
    owner = {}
    for k, (a, b) in enumerate(groups):
        for s in range(a, b):
            for p in segs[s]:
                owner[p] = k
    drafts = []
    for k, (a, b) in enumerate(groups):
        core = sorted(p for s in range(a, b) for p in segs[s])
        nodes, needs = _closure(graph, core, prod, derived, inits, owner, k)
        drafts.append((nodes, needs))
    wanted: dict[int, list[str]] = {k: [] for k in range(len(groups))}  # interface outputs per producing piece
    for k, (_, needs) in enumerate(drafts):
        for t in needs:
            if t in prod and owner[prod[t]] != k and t not in wanted[owner[prod[t]]]:
                wanted[owner[prod[t]]].append(t)
    pieces = []
    for k, ((a, b), (nodes, needs)) in enumerate(zip(groups, drafts)):
        made = {o for p in nodes for o in graph.node[p].output}
        stage_in = [t for t in graph_inputs if t in needs]
        iface_in = [t for t in needs if t in prod]
        own_out = [t for t in graph_outputs if t in made]
        iface_out = [t for t in wanted[k] if t not in own_out]
        used_inits = sorted({i for p in nodes for i in graph.node[p].input if i in inits})
        pieces.append(Piece(k, (layers[a], layers[b - 1] + 1), tuple(nodes), tuple(stage_in + iface_in),
                            tuple(own_out + iface_out), tuple(iface_in), tuple(iface_out), tuple(used_inits)))
    return pieces


def _closure(graph, core, prod, derived, inits, owner, k) -> tuple[list[int], list[str]]:
    """Piece k's nodes (its own plus the shape-derived ones it recomputes) and the tensors it needs from outside
    (stage inputs and interface tensors, in first-read order)."""
    nodes = set(core)
    needs: list[str] = []
    stack = list(core)
    while stack:
        p = stack.pop()
        for t in graph.node[p].input:
            if not t or t in inits:
                continue
            q = prod.get(t)
            if q is None or (owner.get(q) != k and t not in derived):
                if t not in needs:
                    needs.append(t)
            elif q not in nodes:  # shape-derived, computed elsewhere: recompute here
                nodes.add(q)
                stack.append(q)
    order = sorted(nodes)
    first = {}
    for p in order:
        for t in graph.node[p].input:
            first.setdefault(t, p)
    needs.sort(key=lambda t: first.get(t, 0))
    return order, needs


def piece_model(model, piece: Piece, value_types: dict[str, tuple[int, list]] | None = None):
    """`piece` as a ModelProto: its nodes, the initializers they read (external data left as references into the
    block's files), the stage I/O it touches and interface tensors typed from `value_types` (name -> (elem
    type, dims with None for unknown)). Defaults to None (`value_types(model)`)."""
    from onnx import helper

    graph = model.graph
    types = value_types if value_types is not None else tensor_types(model)
    io = {v.name: v for v in list(graph.input) + list(graph.output)}

    def info(name):
        if name in io:
            return copy.deepcopy(io[name])
        elem, dims = types[name]
        return helper.make_tensor_value_info(name, elem, [d if d is not None else f"{name}_d{i}"
                                                          for i, d in enumerate(dims)])

    wanted = set(piece.initializers)
    g = helper.make_graph([copy.deepcopy(graph.node[p]) for p in piece.nodes], f"{graph.name}_piece{piece.index}",
                          [info(t) for t in piece.inputs], [info(t) for t in piece.outputs],
                          initializer=[copy.deepcopy(t) for t in graph.initializer if t.name in wanted])
    out = helper.make_model(g, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def tensor_types(model) -> dict[str, tuple[int, list]]:
    """name -> (ONNX elem type, dims with None where unknown) of every tensor ONNX shape inference can type."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    out = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.elem_type and t.HasField("shape"):
            out[v.name] = (t.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim])
    return out


def interface_shapes(model, shapes: dict[str, tuple[int, ...]], names) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of `names` when the graph's inputs have `shapes`, weights unread.

    The shape-derived tensors are evaluated with numpy (ONNX's reference evaluator on zero-stride stand-ins of
    the inputs), frozen into constants, then ONNX shape inference runs on the concrete graph.

    Raises:
        ArtifactError: a tensor whose shape inference cannot tell.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from graphs.onnx_passes import tensor_bytes

    graph = model.graph
    derived = shape_derived(graph)
    inits = {t.name for t in graph.initializer}
    sd_nodes = [n for n in graph.node if all(o in derived for o in n.output if o)]
    sd_out = [o for n in sd_nodes for o in n.output if o]
    small_inits = [t for t in graph.initializer if tensor_bytes(t) <= (1 << 16) and not _is_external(t)]
    reads = {i for n in sd_nodes for i in n.input if i}
    sd_inputs = [v for v in graph.input if v.name in reads and v.name not in inits]
    needed_inits = {i for n in sd_nodes for i in n.input if i in inits}
    small = {t.name for t in small_inits}
    if not needed_inits <= small:  # a large constant feeding a shape computation: read it from the model as is
        small_inits = [t for t in graph.initializer if t.name in needed_inits]
    sub = helper.make_graph([copy.deepcopy(n) for n in sd_nodes], "sd", [copy.deepcopy(v) for v in sd_inputs],
                            [helper.make_empty_tensor_value_info(o) for o in sd_out],
                            initializer=[t for t in small_inits if t.name in needed_inits])
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    sub_model.ir_version = model.ir_version
    dtypes = {v.name: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for v in sd_inputs}
    feeds = {v.name: np.broadcast_to(np.zeros((), dtypes[v.name]), shapes[v.name]) for v in sd_inputs}
    values = dict(zip(sd_out, ReferenceEvaluator(sub_model).run(None, feeds))) if sd_nodes else {}
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    g = frozen.graph
    keep = [n for n in g.node if not all(o in derived for o in n.output if o)]
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in values.items())
    del g.value_info[:]
    for v in g.input:
        if v.name in shapes:
            dims = v.type.tensor_type.shape.dim
            for d, s in zip(dims, shapes[v.name]):
                d.Clear()
                d.dim_value = int(s)
    inferred = onnx.shape_inference.infer_shapes(frozen, strict_mode=False, data_prop=True)
    known = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            known[v.name] = tuple(int(d.dim_value) for d in dims)
    known.update({name: tuple(np.asarray(v).shape) for name, v in values.items()})
    missing = [n for n in names if n not in known]
    if missing:
        raise ArtifactError(f"block graph {graph.name!r}: ONNX shape inference cannot tell the shape of "
                            f"{', '.join(missing)} at input shapes {shapes}; csprt cannot size the interface between "
                            "its pieces; build the stage as one engine (a larger --max-build-memory)")
    return {n: known[n] for n in names}


def _is_external(t) -> bool:
    from onnx import external_data_helper as ext
    return ext.uses_external_data(t)
