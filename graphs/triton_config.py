"""Triton `config.pbtxt` text for an artifact's stages and its BLS orchestrator. Pure: Layout in, text out.

    StageSpec llm_0 --stage_config(backend="onnxruntime")--> name: "csprt_llm_0"
                                                              platform: "onnxruntime_onnx"  (or tensorrt_plan)
                                                              max_batch_size: 8    (the batch dim's max: every
                                                                                    tensor leads with `batch`)
                                                              # [batch, prefix_len]; batch=1:4:8 prefix_len=...
                                                              input { name, data_type: TYPE_INT64, dims: -1 }
                                                              parameters { key: "csprt_dims" ... "batch=1:4:8 prefix_len=1:109:256" }
    Layout --bls_config()--> the Python-backend model taking image/query/mode, returning mask_png/answer/...

A stage whose every input and output leads with the `batch` dim gets Triton's batch axis: max_batch_size
is the batch dim's max (the engine's, when `csprt build --shapes` narrowed it) and the dims below leave
it out; a [batch] tensor is dims [1] with an empty reshape. A stage with a tensor that does not lead
with it (seg_head and sam_decoder: [num_seg, ...], the [SEG] rows of the whole batch, flat) keeps
max_batch_size 0 and full shapes, its batch dim -1. Either way one request to a stage model is a whole
batch (the BLS model sends it); Triton batches nothing itself (no dynamic_batching on stage models:
their requests already are batches, and the KV cache of generate mode belongs to one batch).

Named dims ("prefix_len") and expression dims ("past_llm_0 + step_len") become -1. Their exported
min/opt/max ranges go into a comment beside each dims line and into the `csprt_dims` parameter (in
`csprt build --shapes` syntax), which Triton passes through and reports in the model's config
endpoint. The config is Triton's own ModelConfig protobuf (tritonclient's model_config_pb2, imported
on first use: the `serve` extra) printed by protobuf's text_format, one top-level field or repeated
entry at a time so that csprt's comments can go between them (text_format writes no comments);
the tests parse the files back with the same proto. Fields at their default (max_batch_size 0, an
empty platform) are not printed, as text_format does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from graphs.errors import ToolchainError, internal_error
from graphs.stages import DimRange, Layout, StageSpec, TensorSpec

# manifest dtype (and those a tensor between the engine pieces of a block may have) -> Triton data type
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "bool": "TYPE_BOOL",
                 "int32": "TYPE_INT32"}

# csprt stage backend -> (Triton platform, Triton backend, model file in the version directory).
# tensorrt-rtx: stock Triton's `tensorrt` backend links data-center TensorRT (libnvinfer), which cannot
# deserialize TensorRT-RTX plans; such plans need a Triton build whose backend links TensorRT-RTX,
# installed as backends/tensorrt_rtx/. No platform string exists for it, so only `backend` is set.
STAGE_BACKENDS = {
    "onnxruntime": ("onnxruntime_onnx", "onnxruntime", "model.onnx"),
    "tensorrt": ("tensorrt_plan", "tensorrt", "model.plan"),
    "tensorrt-rtx": ("", "tensorrt_rtx", "model.plan"),
}
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}
DIMS_PARAMETER = "csprt_dims"

BATCH_DIM = "batch"  # graphs.stages: every graph's leading dim, requests batched together (1 to --max-batch)

_BATCH_NOTE = (
    "max_batch_size {max}: every tensor leads with the batch dim (1 to {max}, csprt export --max-batch), which\n"
    "Triton owns: the dims below leave it out. One request is one batch of images from the BLS model.")
_NO_BATCH_NOTE = (
    "max_batch_size 0: Triton adds no batch axis (0 is Triton's default, so the field is not written). Some\n"
    "tensors here do not lead with the batch dim (the [SEG] rows of a whole batch, flat), so the dims below are\n"
    "the full tensor shapes, the batch dim -1. One request is one batch of images from the BLS model.")


@dataclass(frozen=True)
class BlsTensor:
    """One request or response tensor of the BLS orchestrator (names shared with `csprt serve`)."""

    name: str
    data_type: str            # Triton TYPE_*; TYPE_STRING is Triton's BYTES
    dims: tuple[int, ...]     # without the batch axis Triton adds when max_batch_size > 0
    optional: bool = False
    doc: str = ""


BLS_INPUTS = (
    BlsTensor("image", "TYPE_STRING", (1,), doc="the encoded image file (JPEG, PNG, WebP ...)"),
    BlsTensor("query", "TYPE_STRING", (1,), doc="the question, UTF-8"),
    BlsTensor("mode", "TYPE_STRING", (1,), True, "single-pass (default) or generate"),
    BlsTensor("return_logits", "TYPE_BOOL", (1,), True, "also return mask_logits. Defaults to false"),
    BlsTensor("max_new_tokens", "TYPE_INT64", (1,), True,
              "generate mode: token limit. Defaults to 32 or the exported limit if lower (as csprt run and serve)"),
)
BLS_OUTPUTS = (
    BlsTensor("mask_png", "TYPE_STRING", (1,), doc="union of the masks at the image size, 8-bit PNG 0/255 (csprt run's mask.png)"),
    BlsTensor("masks_packed", "TYPE_UINT8", (-1,),
              doc="np.packbits of the bool masks [K, H, W] (C order, big bit order)"),
    BlsTensor("masks_shape", "TYPE_INT64", (3,), doc="[K, H, W] of masks_packed; K = 0 when no [SEG] was produced"),
    BlsTensor("mask_logits", "TYPE_FP32", (-1, -1, -1), doc="[K, H, W] float32 logits; only with return_logits"),
    BlsTensor("answer", "TYPE_STRING", (1,), doc="the text answer, UTF-8"),
    BlsTensor("generated_ids", "TYPE_INT64", (-1,), doc="generated token ids (empty in single-pass mode)"),
    BlsTensor("timings", "TYPE_STRING", (1,), doc="JSON {step: ms}: decode_image, preprocess, each stage, postprocess, "
                                                  "segment, encode, total; decode_steps (a count)"),
    BlsTensor("host_steps", "TYPE_STRING", (1,), doc="JSON of what the artifact's host steps report (an ACCM "
                                                     "artifact's candidate captions and the chosen one); absent "
                                                     "when it has none"),
)
def model_config_pb2():
    """Triton's own ModelConfig protobuf module (from tritonclient, csprt's `serve` extra), imported on first use so
    that importing this module (for BATCH_DIM, KINDS ...) costs nothing.

    Raises:
        ToolchainError: tritonclient is not installed (one line naming the fix).
    """
    try:
        from tritonclient.grpc import model_config_pb2 as pb
    except ImportError as e:
        raise ToolchainError(f"writing Triton's config.pbtxt needs Triton's model-config protobuf from tritonclient "
                             f"({e}); install it: pip install -e '.[serve]'") from None
    return pb


def _check_text(text: str) -> str:
    if any(not c.isprintable() for c in text):
        raise internal_error(f"config string {text!r} has non-printable characters")
    return text


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in text.replace("\r", "").split("\n"))


def _render(pieces: list[tuple[str, object]]) -> str:
    """config.pbtxt text: each (comment, ModelConfig holding one field or one repeated entry) printed by protobuf's
    text_format, its comment lines before it. Text-format messages concatenate into their merge, so the file parses
    as the whole config; only the comments are csprt's own text (text_format prints none)."""
    from google.protobuf import text_format

    return "".join((_comment(note) if note else "") + text_format.MessageToString(piece) for note, piece in pieces)


def triton_dims(shape: tuple[int | str, ...]) -> list[int]:
    """Manifest shape -> Triton dims: static ints kept, named and expression dims -1."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _range(name: str, r: DimRange) -> str:
    return f"{name}={r.min}:{r.opt}:{r.max}"


def _dims_note(t: TensorSpec, dims: dict[str, DimRange]) -> str:
    """"[1, prefix_len, 64]; prefix_len=1:109:256" for a tensor with dynamic dims, "" for a static one."""
    if all(isinstance(d, int) for d in t.shape):
        return ""
    named = [d for d in t.shape if isinstance(d, str) and d in dims]
    ranges = "; ".join(_range(d, dims[d]) for d in dict.fromkeys(named))
    return "[" + ", ".join(map(str, t.shape)) + "]" + (f"; {ranges}" if ranges else "")


def _tensor(pb, kind: str, t: TensorSpec, dims: dict[str, DimRange], batched: bool = False) -> tuple[str, object]:
    """One input/output entry (`kind`: "input" or "output"); `batched`: Triton owns the leading batch dim (left out;
    [batch] -> [1], reshape [])."""
    if t.dtype not in TRITON_DTYPES:
        raise internal_error(f"tensor {t.name!r} has dtype {t.dtype!r}, not one of {tuple(TRITON_DTYPES)}")
    shape = triton_dims(t.shape[1:] if batched else t.shape)
    piece = pb.ModelConfig()
    entry = getattr(piece, kind).add(name=_check_text(t.name), data_type=pb.DataType.Value(TRITON_DTYPES[t.dtype]),
                                     dims=shape or [1])
    if batched and not shape:
        entry.reshape.SetInParent()  # reshape { }: the per-request [1] is a scalar in the model
    return _dims_note(t, dims), piece


def _instances(pb, count: int, kind: str, profiles: int = 1) -> object:
    if kind not in KINDS:
        raise internal_error(f"instance kind {kind!r} not in {tuple(KINDS)}")
    if count < 1 or profiles < 1:
        raise internal_error(f"instance count {count} or profile count {profiles} < 1")
    # A plan of several optimization profiles (a block's prefill and decode): Triton uses only profile 0 unless
    # the instance group lists them; listed, it picks per request by the input shapes.
    listed = [str(i) for i in range(profiles)] if profiles > 1 else []
    return pb.ModelConfig(instance_group=[pb.ModelInstanceGroup(
        count=count, kind=pb.ModelInstanceGroup.Kind.Value(KINDS[kind]), profile=listed)])


def _parameters(pb, values: dict[str, str]) -> object:
    piece = pb.ModelConfig()
    for k, v in values.items():
        piece.parameters[_check_text(k)].string_value = _check_text(v)
    return piece


def stage_dims_used(stage: StageSpec, dims: dict[str, DimRange], inputs: Iterable[str] | None = None) -> dict[str, DimRange]:
    """The named dims the stage's inputs use (only `inputs` when given), first-use order, ranges from `dims`."""
    keep = None if inputs is None else set(inputs)
    out: dict[str, DimRange] = {}
    for t in stage.inputs:
        if keep is None or t.name in keep:
            for d in t.shape:
                if isinstance(d, str) and d in dims:
                    out.setdefault(d, dims[d])
    return out


def stage_max_batch(stage: StageSpec, dims: dict[str, DimRange], inputs: Iterable[str] | None = None) -> int:
    """Triton's max_batch_size for a stage model: the batch dim's max when every input (of `inputs`, when given)
    and output leads with the batch dim, else 0 (see the module doc)."""
    keep = None if inputs is None else set(inputs)
    tensors = [t for t in stage.inputs if keep is None or t.name in keep] + list(stage.outputs)
    if BATCH_DIM not in dims or not tensors or any(t.shape[:1] != (BATCH_DIM,) for t in tensors):
        return 0
    return dims[BATCH_DIM].max


def stage_config(stage: StageSpec, dims: dict[str, DimRange], *, name: str, backend: str = "onnxruntime",
                 instances: int = 1, kind: str = "gpu", inputs: Iterable[str] | None = None, header: str = "",
                 profiles: int = 1) -> str:
    """config.pbtxt of one stage model.

    Args:
        stage (StageSpec): the stage (its I/O names, dtypes and shapes).
        dims (dict[str, DimRange]): named-dim ranges: the manifest's, or the engine's when `csprt build
            --shapes` narrowed them.
        name (str): the Triton model name (its directory name).
        backend (str): "onnxruntime", "tensorrt" or "tensorrt-rtx" (see `STAGE_BACKENDS`). Defaults to "onnxruntime".
        instances (int): instance count. Defaults to 1.
        kind (str): "gpu" or "cpu" instances. Defaults to "gpu".
        inputs (Iterable[str] | None): the inputs the graph or engine really has, when it dropped spec inputs
            it never reads (Triton rejects a config input the model lacks). Defaults to None (every spec input).
        header (str): comment lines to put first. Defaults to "".
        profiles (int): the TensorRT plan's optimization profiles, all listed for every instance when more than
            one (a decoded block's prefill and decode). Defaults to 1.
    """
    if backend not in STAGE_BACKENDS:
        raise internal_error(f"stage backend {backend!r} not in {tuple(STAGE_BACKENDS)}")
    platform, triton_backend, filename = STAGE_BACKENDS[backend]
    keep = None if inputs is None else list(inputs)
    ins = [t for t in stage.inputs if keep is None or t.name in keep]
    if keep is not None and len(ins) != len(keep):
        raise internal_error(f"stage {stage.name!r}: inputs {keep} are not all in the spec")
    used = stage_dims_used(stage, dims, keep)
    max_batch = stage_max_batch(stage, dims, keep)
    pb = model_config_pb2()
    pieces = [(header, pb.ModelConfig(name=_check_text(name)))]
    if platform:
        pieces.append(("", pb.ModelConfig(platform=platform)))
    pieces += [("", pb.ModelConfig(backend=triton_backend)), ("", pb.ModelConfig(default_model_filename=filename)),
               (_BATCH_NOTE.format(max=max_batch) if max_batch else _NO_BATCH_NOTE,
                pb.ModelConfig(max_batch_size=max_batch))]
    pieces += [_tensor(pb, "input", t, dims, bool(max_batch)) for t in ins]
    pieces += [_tensor(pb, "output", t, dims, bool(max_batch)) for t in stage.outputs]
    pieces.append(("", _instances(pb, instances, kind, profiles)))
    params = {"csprt_stage": stage.name, "csprt_kind": stage.kind}
    note = ""
    if used:
        note = "Exported min:opt:max of each named dim (-1 above), in csprt build --shapes syntax."
        params[DIMS_PARAMETER] = " ".join(_range(k, r) for k, r in used.items())
    pieces.append((note, _parameters(pb, params)))
    return _render(pieces)


def bls_inputs(layout: Layout) -> tuple[BlsTensor, ...]:
    """The BLS model's request tensors for `layout`: BLS_INPUTS, plus instance_masks for seg_first artifacts."""
    host = {t.name: t for t in layout.host_inputs}
    if "instance_masks" not in host:
        return BLS_INPUTS
    grid = tuple(host["instance_masks"].shape[2:])  # (g, g): the CLIP token grid ([batch, instances, g, g])
    masks = BlsTensor("instance_masks", "TYPE_FP32", (-1, *grid), True,
                      "[M, grid, grid] instance masks on the CLIP token grid (schedules clustering with seg_first)")
    return (*BLS_INPUTS, masks)


def _bls_tensor(pb, kind: str, t: BlsTensor) -> tuple[str, object]:
    piece = pb.ModelConfig()
    entry = getattr(piece, kind).add(name=t.name, data_type=pb.DataType.Value(t.data_type), dims=t.dims)
    if t.optional:
        entry.optional = True
    return t.doc, piece


def bls_config(layout: Layout, *, name: str, instances: int = 1, max_batch_size: int = 0,
               max_queue_delay_us: int = 0, parameters: dict[str, str] | None = None, header: str = "") -> str:
    """config.pbtxt of the BLS orchestrator (Python backend, KIND_CPU: it tokenizes and resizes on the host).

    Args:
        layout (Layout): the artifact's layout (for its seg_first instance_masks input).
        name (str): the Triton model name.
        instances (int): instance count: requests in flight at once. Defaults to 1.
        max_batch_size (int): 0, or the most requests Triton's dynamic batcher hands one `execute` call
            (which runs them as one batched pipeline call); each request carries one image (batch dim 1).
            Defaults to 0.
        max_queue_delay_us (int): how long the dynamic batcher may hold a request to fill a batch.
            Defaults to 0.
        parameters (dict[str, str] | None): extra `parameters` entries. Defaults to None.
        header (str): comment lines to put first. Defaults to "".
    """
    if max_batch_size < 0:
        raise internal_error(f"max_batch_size {max_batch_size} < 0")
    pb = model_config_pb2()
    pieces = [(header, pb.ModelConfig(name=_check_text(name), backend="python"))]
    if max_batch_size:
        pieces += [("Each request carries one image: dims below get Triton's batch axis, of size 1 per request;\n"
                    "the dynamic batcher hands up to max_batch_size requests to one execute() call, which runs\n"
                    "them as one batched pipeline call (one request per stage model for the whole batch).",
                    pb.ModelConfig(max_batch_size=max_batch_size)),
                   ("", pb.ModelConfig(dynamic_batching=pb.ModelDynamicBatching(
                       max_queue_delay_microseconds=max_queue_delay_us)))]
        pieces[-1][1].dynamic_batching.SetInParent()  # present even with a 0 delay: it turns the batcher on
    else:
        pieces.append(("max_batch_size 0 (Triton's default, so not written): one image per request, dims as "
                       "written (no batch axis).", pb.ModelConfig()))
    pieces += [_bls_tensor(pb, "input", t) for t in bls_inputs(layout)]
    pieces += [_bls_tensor(pb, "output", t) for t in BLS_OUTPUTS]
    pieces.append(("", _instances(pb, instances, "cpu")))
    if parameters:
        pieces.append(("", _parameters(pb, dict(parameters))))
    return _render(pieces)
