"""Running a stage built as several engines (`engines.split_build`) as one stage: its pieces in order.

    TrtRunner(stage, art) finds "pieces" in the stage's sidecar and runs, per call, on one stream:

    stage inputs --copied once into the stage's buffers-------------------------------+
    cache inputs --bound at their own addresses (each piece its own layers' subset)---+
                     v                                                                 v
              piece 0 --interface tensors (hidden rows, cos/sin, mask) in buffers--> piece 1 --> ... --> stage outputs
                     (each piece's output shapes, read from its context, set the next one's input shapes)

`piece_buffer_plan` (pure: no TensorRT, no torch) gives the stage's buffers plus one buffer per interface
tensor at its largest shape over the profiles (the piece sidecars' "interface_outputs"); `piece_bindings`
says which buffer each piece's every tensor binds to. Every binding is fixed at activation except the KV cache,
bound per call at the caller's addresses (the Pipeline's buffers: never copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engines.gpu_plan import GraphCache, graph_key
from engines.profiles import Profile, call_profile, profiles_from_json
from graphs.errors import ArtifactError, ToolchainError, internal_error


@dataclass
class PieceRun:
    """One piece's engine at run time."""

    index: int
    sidecar: dict
    plan_path: object
    profiles: list[Profile]
    inputs: list[str]
    outputs: list[str]
    engine: object = None
    contexts: list = field(default_factory=list)  # one per optimization profile, as the stage engine's
    graphs: GraphCache = field(default_factory=GraphCache)


def piece_buffer_plan(base: dict, pieces: list[dict]) -> dict:
    """The stage's buffers (`buffer_plan`) plus each interface tensor's, at its largest shape.

    Args:
        base (dict[str, BufferSpec]): `engines.trt_runner.buffer_plan` of the stage.
        pieces (list[dict]): the piece sidecars, in order.

    Returns:
        dict[str, BufferSpec]: name -> spec; interface tensors have io "interface".
    """
    from engines.trt_runner import ITEMSIZE, BufferSpec

    plan = dict(base)
    for piece in pieces:
        for name, spec in (piece.get("interface_outputs") or {}).items():
            shape = tuple(int(d) for d in spec["max_shape"])
            if name in plan:
                raise internal_error(f"interface tensor {name!r} of piece {piece.get('piece')} is also a stage tensor "
                                     "or another piece's; rebuild with: csprt build ART")
            plan[name] = BufferSpec(name, "interface", spec["dtype"], shape, math.prod(shape) * ITEMSIZE[spec["dtype"]])
    return plan


def piece_bindings(pieces: list[dict], cache_inputs) -> list[dict[str, str]]:
    """For each piece, tensor name -> what it binds to: "buffer" (the stage's or an interface buffer, fixed at
    activation) or "cache" (the caller's KV cache tensor, per call).

    Raises:
        ArtifactError: a piece reads an interface tensor no earlier piece writes (the sidecars do not chain).
    """
    written: set[str] = set()
    out = []
    for piece in pieces:
        for name in piece.get("interface_inputs") or ():
            if name not in written:
                raise ArtifactError(f"engine piece {piece.get('piece')} of stage {piece.get('stage')!r} reads "
                                    f"{name!r}, which no earlier piece writes; rebuild with: csprt build ART")
        binds = {n: "cache" if n in cache_inputs else "buffer" for n in list(piece["inputs"]) + list(piece["outputs"])}
        written.update(piece.get("interface_outputs") or {})
        out.append(binds)
    return out


class PiecesMixin:
    """What `TrtRunner` adds to run a stage built in pieces (`self.pieces`: the piece sidecars, else [])."""

    pieces: list = []  # a stage built as one engine; TrtRunner sets its own list

    def _activate_pieces(self, torch, stream) -> None:
        self._parts = []
        binds = piece_bindings(self.pieces, self._cache_inputs)
        self._buffers = self._allocate(torch, self.buffers_plan)
        for piece, bind in zip(self.pieces, binds):
            part = PieceRun(piece["piece"], piece, self.art_dir / piece["plan"], profiles_from_json(piece["profiles"]),
                            list(piece["inputs"]), list(piece["outputs"]))
            part.engine = self._deserialize(part.plan_path)
            names = {part.engine.get_tensor_name(i) for i in range(part.engine.num_io_tensors)}
            if names != set(part.inputs) | set(part.outputs):
                raise ArtifactError(f"stage {self.name!r}: engine {piece['plan']} does not match its sidecar (tensors "
                                    f"{sorted(names ^ (set(part.inputs) | set(part.outputs)))} differ); rebuild with: "
                                    "csprt build ART")
            part.contexts = self._create_contexts(part.engine, stream, part.profiles, part.plan_path)
            for n, how in bind.items():
                if how == "buffer":  # every profile's context runs on the same buffers
                    for context in part.contexts:
                        context.set_tensor_address(n, self._buffers[n].data_ptr())
            self._parts.append(part)
        self._inputs = [t.name for t in self.stage.inputs if any(t.name in p.inputs for p in self._parts)]
        missing = [t.name for t in self.stage.outputs if not any(t.name in p.outputs for p in self._parts)]
        if missing:
            raise ArtifactError(f"stage {self.name!r}: no engine piece writes {', '.join(missing)}; rebuild with: "
                                "csprt build ART")

    def _run_pieces(self, feed: dict, stream) -> dict:
        """Every piece in order on `stream`; returns the stage outputs as views of their buffers."""
        import torch

        copied = {"inputs": 0, "cache": 0}
        shapes = {n: tuple(feed[n].shape) for n in self._inputs}
        cache_addr = {}
        outputs = {t.name for t in self.stage.outputs}
        out_shapes: dict[str, tuple[int, ...]] = {}
        with torch.cuda.stream(stream):
            for n in self._inputs:
                if n in self._cache_inputs:
                    cache_addr[n] = self._cache_address(n, feed[n], copied)  # staged once for every piece
                else:
                    copied["inputs"] += self._load(n, feed[n])
            for part in self._parts:
                own = {n: shapes[n] if n in shapes else out_shapes[n] for n in part.inputs}
                profile = call_profile(part.profiles, own)
                ctx = part.contexts[profile]  # set to `profile` once, at activation
                addresses = []
                for n in part.inputs:
                    ctx.set_input_shape(n, own[n])
                    if n in cache_addr:
                        ctx.set_tensor_address(n, cache_addr[n])
                        addresses.append(cache_addr[n])
                made = {n: tuple(ctx.get_tensor_shape(n)) for n in part.outputs}
                self._check_piece_shapes(part, made)
                out_shapes.update(made)
                self._execute((part.index,) + graph_key(profile, own) + tuple(addresses), stream, self._is_step(),
                              ctx, part.graphs)
        self.last_copied = copied
        return {n: self._buffers[n][:math.prod(s)].view(s) for n, s in out_shapes.items() if n in outputs}

    def _check_piece_shapes(self, part: PieceRun, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in shapes.items():
            if any(int(d) < 0 for d in shape):
                raise internal_error(f"stage {self.name!r} piece {part.index}: TensorRT cannot tell the shape of "
                                     f"{name!r} before running (data-dependent)")
            b = self.buffers_plan[name]
            if math.prod(shape) > math.prod(b.max_shape):  # buffers hold their largest shape
                raise ToolchainError(f"stage {self.name!r} piece {part.index}: {name!r} shape {shape} exceeds its buffer "
                                     f"{b.max_shape}; rebuild with: csprt build ART")
