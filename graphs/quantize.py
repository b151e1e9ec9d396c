"""Quantized LLM stages: a pass over an exported artifact's decoder blocks (`llm_<i>`) with ONNX Runtime's tools
or NVIDIA ModelOpt's.

    csprt export CKPT --schedule S --out ART --quantize int8|int4-wo|fp8 [--quantize-format ort|qdq|modelopt]

    float export (as always) --> manifest.json (float)
        --calibration feeds (qdq int8 / fp8 and every modelopt method: engines.calibration runs the float artifact on
          ONNX Runtime)-->
    graphs/llm_<i>.onnx  --onnxruntime.quantization | modelopt-->  graphs/llm_<i>.onnx (quantized; written
        atomically, weights still one copy: inline under 2 GB, else <stage>.onnx.data). int4-wo and int8 ort go a
        weight at a time (graphs/quantize_stream.py: bounded memory, fp32 or fp16 graphs); qdq int8 and fp8 run the
        whole-graph quantize_static on fp32 graphs; modelopt runs ModelOpt's whole-graph quantizer in its own
        environment (graphs/quantize_modelopt.py), fp32 or fp16
    manifest.json: "quantization" record, the quantized stages' files and export keys, tolerances; written last

One artifact holds one format, because the two targets take different graphs (a TensorRT engine cannot take
ONNX Runtime's contrib ops MatMulNBits / MatMulInteger; ONNX Runtime runs both):

    method    ort (ONNX Runtime CPU, the default for int8 and int4-wo)      qdq (TensorRT, TensorRT-RTX; also ORT)
    int8      quantize_dynamic: weights int8 per output channel; the        quantize_static QDQ: weights int8 per
              activations quantized per call (DynamicQuantizeLinear,        channel, activations int8 per tensor,
              MatMulInteger)                                                scales from the calibration set
    int4-wo   MatMulNBits: int4 blocks of `block_size` along K, one fp       DequantizeLinear int4 blocked (opset
              scale per block (round to nearest), `accuracy_level`          21) -> MatMul: weight-only, RTN
    fp8       (none: ONNX Runtime's CPU has no fp8 GEMM)                    quantize_static QDQ float8 e4m3fn

modelopt makes the same kind of graphs as qdq for the same targets, with NVIDIA's recipes: int4-wo AWQ-clip (block
scales searched on the calibration activations), int8 entropy-calibrated, fp8 max-calibrated with per-channel
weight scales; int8/fp8 weights are stored quantized, and GEMV MatMuls (the LM head on one row) stay float.

Only MatMuls whose B is a weight (an initializer) are quantized: attention's activation x activation MatMuls,
the norms, softmax and every selection op stay float. The embeddings, vision tower, SAM, the projector and
text_hidden_fcs stay float: the last two hold 22M parameters at LISA-7B (Linear 1024x4096, 4096x4096 and
4096x256), 0.3% of the decoder blocks' 6.6 billion, so quantizing them would not pay.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from graphs.errors import ArtifactError, InputError, ToolchainError, internal_error

METHODS = ("none", "int8", "int4-wo", "fp8")
FORMATS = ("ort", "qdq", "modelopt")
DEFAULT_FORMAT = {"int8": "ort", "int4-wo": "ort", "fp8": "qdq"}
BITS = {"int8": 8, "int4-wo": 4, "fp8": 8}
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
CALIBRATION_FORMAT = "csprt.calibration"
# End-to-end tolerances of a quantized artifact against the float reference: pass or fail on mask IoU and
# generated ids; mask logits are reported, not judged (None). Per-stage statistics of the quantized stages are
# reported, not judged either. Measured on the tiny checkpoint with trained-like weights (`csprt make-tiny
# --llm-weights trained-like`), all 5 presets, both modes, both formats: worst mask IoU int8 0.922 (csp-70, ort),
# int4-wo 0.812 (full, qdq), fp8 0.745 (csp-70); ids identical everywhere. Each bound is that worst case less a
# margin (docs/benchmarks.md, "Quantized artifacts").
QUANT_E2E_TOLERANCES = {"int8": {"mask_logits_atol": None, "mask_iou_min": 0.9},
                        "int4-wo": {"mask_logits_atol": None, "mask_iou_min": 0.8},
                        "fp8": {"mask_logits_atol": None, "mask_iou_min": 0.7}}
# The built-in calibration set: the prompt corpus's queries a user could send (graphs.tokenizer.CORPUS_QUERIES, less
# the empty one and those with control tokens) and two plain ones, each on one of four synthetic images (seeded:
# the same bytes everywhere, so the set has one hash).
CALIBRATION_QUERIES = (
    "Where is the cat in this picture?",
    "What is the food with the most vitamin C in this picture? Please respond with a mask.",
    "Where is the red disc in this picture?",
    "Digits 0 1 12 2024 3.14159 and 1,000,000 apples",
    "Unicode: café naïve Straße 東京 😀 — “quotes” ½",
    "Please segment the object on the left.",
)


@dataclass(frozen=True)
class QuantOptions:
    """What `csprt export --quantize` takes.

    Args:
        method (str): none, int8, int4-wo or fp8. Defaults to "none".
        format (str | None): "ort", "qdq" or "modelopt". Defaults to None (ort for int8 and int4-wo, qdq for
            fp8).
        block_size (int): int4-wo weights per scale, along K. Defaults to 32.
        accuracy_level (int): MatMulNBits compute type (4: int8 activations, the fastest on CPU). Defaults to 4.
        calibration (str | None): a calibration set file (see `load_calibration`). Defaults to None (built in).
    """

    method: str = "none"
    format: str | None = None
    block_size: int = 32
    accuracy_level: int = 4
    calibration: str | None = None

    def resolved(self) -> "QuantOptions":
        """Checked, with the format filled in. Raises InputError naming the valid choices."""
        if self.method not in METHODS:
            raise InputError(f"--quantize {self.method!r}: choose one of {', '.join(METHODS)}")
        fmt = self.format or DEFAULT_FORMAT.get(self.method)
        if self.method == "none":
            return QuantOptions()
        if fmt not in FORMATS:
            raise InputError(f"--quantize-format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if self.method == "fp8" and fmt == "ort":
            raise InputError("--quantize fp8 --quantize-format ort: ONNX Runtime's CPU has no fp8 GEMM; fp8 is "
                             "for TensorRT (SM89+): use --quantize-format qdq or modelopt")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"--quantize-block-size {self.block_size}: choose one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise InputError(f"--quantize-accuracy-level {self.accuracy_level}: choose one of 0 (unset), 1 (fp32), "
                             "2 (fp16), 3 (bf16), 4 (int8)")
        return QuantOptions(self.method, fmt, self.block_size, self.accuracy_level, self.calibration)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales (qdq int8, fp8) and AWQ's activation-aware weight scales (every modelopt
        method) calibrate; dynamic int8 and round-to-nearest int4 need no samples."""
        return self.format == "modelopt" or (self.format == "qdq" and self.method in ("int8", "fp8"))


# --- the calibration set ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSet:
    """(image [H, W, 3] uint8, query) samples and their sha256 (of each query and each image's pixels)."""

    samples: tuple[tuple[np.ndarray, str], ...]
    sha256: str
    source: str


def calibration_images(n: int = 4, h: int = 96, w: int = 128) -> list[np.ndarray]:
    """`n` seeded synthetic RGB images: gradients, a stripe pattern and a coloured disc at a different place each."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / (5.0 + i)) * np.cos(yy / (3.0 + i))], axis=-1)
        cy, cx, r = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w, rng.uniform(0.15, 0.3) * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, size=3)
        out.append((img * 255).round().astype(np.uint8))
    return out


def _hash_samples(samples) -> str:
    h = hashlib.sha256()
    for image, query in samples:
        h.update(query.encode("utf-8") + b"\0" + str(image.shape).encode() + b"\0" + image.tobytes())
    return h.hexdigest()


def builtin_calibration() -> CalibrationSet:
    """The default set: `CALIBRATION_QUERIES` on `calibration_images()`, in turn."""
    images = calibration_images()
    samples = tuple((images[i % len(images)], q) for i, q in enumerate(CALIBRATION_QUERIES))
    return CalibrationSet(samples, _hash_samples(samples), "built-in")


def load_calibration(path: str | os.PathLike | None) -> CalibrationSet:
    """A calibration set file, or the built-in set for None.

    The file is JSON: {"format": "csprt.calibration", "samples": [{"image": PATH, "query": TEXT}, ...]}, image
    paths relative to the file. Raises InputError (one line: what is wrong, what is expected) for a file that is
    missing, not JSON, of another format, without samples, or with a sample whose image or query is unusable.
    """
    if path is None:
        return builtin_calibration()
    from graphs.imageio import load_image

    p = Path(path)
    expected = (f'expected JSON {{"format": "{CALIBRATION_FORMAT}", "samples": [{{"image": PATH, "query": TEXT}}, '
                '...]} with at least one sample')
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"calibration set {p} does not exist; {expected}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"calibration set {p} is unreadable or not JSON ({type(exc).__name__}); {expected}") from None
    if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT or not isinstance(doc.get("samples"), list):
        raise InputError(f"calibration set {p} is not a csprt calibration set; {expected}")
    if not doc["samples"]:
        raise InputError(f"calibration set {p} is empty (no samples); {expected}")
    samples = []
    for i, s in enumerate(doc["samples"]):
        if not isinstance(s, dict) or not isinstance(s.get("query"), str) or not s["query"].strip() \
                or not isinstance(s.get("image"), str):
            raise InputError(f"calibration set {p} sample {i} needs a non-empty \"query\" and an \"image\" path; "
                             f"{expected}")
        try:
            image = load_image(p.parent / s["image"])
        except ToolchainError as exc:
            raise InputError(f"calibration set {p} sample {i}: {exc}") from None
        samples.append((image, s["query"]))
    return CalibrationSet(tuple(samples), _hash_samples(samples), str(p))


# --- the manifest record ---------------------------------------------------------------------------------------

def quantization_of(manifest: dict) -> dict | None:
    """The manifest's quantization record, or None for a float artifact."""
    return manifest.get("quantization") or None


def stage_quantization(manifest: dict, stage: str) -> str:
    """"int8/qdq"-style tag of how `stage`'s graph is quantized, "none" for a float graph (engine sidecars)."""
    q = quantization_of(manifest)
    return f"{q['method']}/{q['format']}" if q and stage in q["stages"] else "none"


def describe(tag: str) -> str:
    return "the float graph" if tag == "none" else f"the {tag.replace('/', ' ')} quantized graph"


def _with_flags(command: str, flags: dict[str, str]) -> str:
    """`command` (a csprt export line) with each `--flag value` of `flags` set (replaced, or appended)."""
    words = shlex.split(command)
    for flag, value in flags.items():
        if flag in words[:-1]:
            words[words.index(flag) + 1] = value
        else:
            words += [flag, value]
    return shlex.join(words)


def with_quantize_format(command: str, fmt: str) -> str:
    """`command` (a csprt export line) with --quantize-format set to `fmt`."""
    return _with_flags(command, {"--quantize-format": fmt})


def export_command(command: str, opts: QuantOptions) -> str:
    """The export line that regenerates a quantized artifact: `command` with the --quantize flags of `opts`."""
    flags = {"--quantize": opts.method, "--quantize-format": opts.format}
    if opts.method == "int4-wo":
        flags["--quantize-block-size"] = str(opts.block_size)
        if opts.format == "ort":
            flags["--quantize-accuracy-level"] = str(opts.accuracy_level)
    if opts.calibration is not None and opts.needs_calibration:
        flags["--calibration"] = str(opts.calibration)
    return _with_flags(command, flags)


def check_buildable(manifest: dict, rebuild_command: str) -> None:
    """Refuse to build TensorRT engines from ONNX Runtime-format quantized graphs, naming the export that fits."""
    q = quantization_of(manifest)
    if q and q["format"] == "ort":
        raise ToolchainError(f"this artifact is quantized {q['method']} in ONNX Runtime's format ({q['ops']}), which "
                             f"TensorRT cannot take; export Q/DQ graphs for TensorRT with: "
                             f"{with_quantize_format(rebuild_command, 'qdq')}")


def weight_bytes(graph_path: str | os.PathLike) -> int:
    """Bytes of a graph's initializers (inline or external), read from the graph alone."""
    import onnx

    from graphs.onnx_passes import iter_tensors

    model = onnx.load(str(graph_path), load_external_data=False)
    total = 0
    for t in iter_tensors(model):
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += onnx.numpy_helper.to_array(t).nbytes
    return total


def artifact_weights(manifest: dict, art_dir: str | os.PathLike) -> dict:
    """Weight bytes of an artifact: {"stages": {name: bytes}, "llm": the decoder blocks', "total"}."""
    stages = {e["name"]: weight_bytes(Path(art_dir) / e["graph"]) for e in manifest["stages"]}
    return {"stages": stages, "llm": sum(stages[n] for n in llm_stages(manifest)), "total": sum(stages.values())}


def quantization_tag(manifest: dict) -> str:
    """"int8/ort"-style tag of an artifact's quantization, "none" for a float one."""
    q = quantization_of(manifest)
    return f"{q['method']}/{q['format']}" if q else "none"


# --- the pass --------------------------------------------------------------------------------------------------

def llm_stages(manifest: dict) -> list[str]:
    """The decoder-block stages (kind "llm"): what --quantize quantizes."""
    return [e["name"] for e in manifest["stages"] if e["kind"] == "llm"]


def weight_matmuls(model) -> list[str]:
    """Names of the MatMul nodes whose B input is an initializer (the Linear layers), in graph order."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


def gemms_to_matmuls(model, base_dir: str | os.PathLike = "") -> int:
    """Rewrite each bias-free Gemm of a weight (the exporter's lm_head: Gemm(x, W[vocab, H], transB=1)) as
    MatMul(x, W^T), in place, so the quantizers (MatMul only) reach it. Returns how many were rewritten.
    A transposed weight kept in external data (a graph loaded without it) is read from `base_dir` and held inline.

        x --Gemm(transB=1)--> y   with W [N, K]        becomes        x --MatMul--> y   with W^T [K, N]
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for i, n in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or len(n.input) != 2 or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0):
            continue
        w = inits[n.input[1]]
        if attrs.get("transB", 0):
            t = numpy_helper.from_array(np_contiguous_t(tensor_array(w, base_dir)), w.name)
            w.CopyFrom(t)
        model.graph.node[i].CopyFrom(helper.make_node("MatMul", [n.input[0], n.input[1]], list(n.output), name=n.name))
        done += 1
    return done


def isolate_inputs(model, nodes: list[str]) -> int:
    """Give the quantized MatMuls' activation inputs a tensor of their own where something else reads it too.

    ONNX Runtime's Q/DQ quantizer puts one QuantizeLinear/DequantizeLinear pair on a tensor and rewires every
    reader to the DequantizeLinear, so an attention MatMul or a graph output reading the same tensor would see
    the quantized value. An Identity in front of the quantized readers keeps the others on the float tensor:

        a --> MatMul(W) ,  a --> other          becomes          a --> Identity --> a_q --> MatMul(W) ,  a --> other

    Returns how many tensors were isolated.
    """
    from onnx import helper

    wanted = set(nodes)
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(model.graph.node):
        for name in set(n.input):
            readers.setdefault(name, []).append(i)
    done = 0
    inserts = []
    for name, idx in readers.items():
        quantized = [i for i in idx if model.graph.node[i].name in wanted and model.graph.node[i].input[0] == name]
        if not quantized or (len(quantized) == len(idx) and name not in outputs):
            continue
        alias = f"{name}__quantized_input"
        for i in quantized:
            model.graph.node[i].input[0] = alias
        inserts.append((min(quantized), helper.make_node("Identity", [name], [alias], name=f"{alias}_identity")))
        done += 1
    for pos, node in sorted(inserts, key=lambda t: -t[0]):  # from the back: earlier positions stay valid
        model.graph.node.insert(pos, node)
    return done


def tensor_array(t, base_dir: str | os.PathLike = "") -> np.ndarray:
    """An initializer's values, its external data read from `base_dir` (one tensor's bytes; a plain read, so an
    artifact copied with hard links (`cp -al`) reads too, which onnx's own reader refuses)."""
    from onnx import external_data_helper as ext
    from onnx import helper, numpy_helper

    if not ext.uses_external_data(t):
        return numpy_helper.to_array(t)
    info = ext.ExternalDataInfo(t)
    with open(Path(base_dir) / info.location, "rb") as f:
        f.seek(info.offset or 0)
        raw = f.read(info.length) if info.length is not None else f.read()
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    if dtype.itemsize * int(np.prod(t.dims)) != len(raw) or t.data_type in (helper.TensorProto.BFLOAT16,):
        inline = type(t)()
        inline.CopyFrom(t)
        del inline.external_data[:]
        inline.data_location = helper.TensorProto.DEFAULT
        inline.raw_data = raw
        return numpy_helper.to_array(inline)
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(t.dims))


def np_contiguous_t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over recorded stage feeds, read one sample per range:
    samples differ in text length, and ONNX Runtime's histogram collector stacks a range's outputs."""

    def __init__(self, feeds: list[dict], names: Iterable[str]):
        names = set(names)
        self._feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


def load_with_data(src: Path):
    """`src` with its weights loaded, read by `tensor_array` (onnx.load refuses data files with several hard
    links, as a `cp -al` copy has, or a new generation whose graph was unchanged: see graphs/artifact_dir.py)."""
    import onnx
    from onnx import external_data_helper as ext
    from onnx import numpy_helper

    from graphs.onnx_passes import iter_tensors

    model = onnx.load(str(src), load_external_data=False)
    for t in iter_tensors(model):
        if ext.uses_external_data(t):
            t.CopyFrom(numpy_helper.from_array(tensor_array(t, src.parent), t.name))
    return model


def prepared_graph(src: Path):
    """`src` as the whole-graph quantizers take it (ONNX Runtime's and ModelOpt's), and its weight MatMuls' names:
    weights loaded (`load_with_data`), the LM head's Gemm rewritten as a MatMul (`gemms_to_matmuls`), and
    value_info dropped: the quantizers re-run ONNX shape inference in a mode that rejects the exporter's symbolic
    annotations on a few Reshape outputs, and they infer what they need anyway."""
    model = load_with_data(src)
    del model.graph.value_info[:]
    gemms_to_matmuls(model)
    nodes = weight_matmuls(model)
    if not nodes:
        raise internal_error(f"quantize: {src} has no weight MatMul to quantize")
    return model, nodes


def quantize_graph(src: Path, dst: Path, opts: QuantOptions, feeds: list[dict] | None = None) -> None:
    """Quantize one float graph `src` (with its data beside it) into `dst` (+ `dst`.data), per `opts`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model, nodes = prepared_graph(src)
    if opts.method == "int4-wo":
        _int4(model, dst, opts, nodes)
    elif opts.format == "ort":  # int8, dynamic
        quantize_dynamic(model, str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    else:  # qdq int8 / fp8, calibrated
        isolate_inputs(model, nodes)
        qtype = QuantType.QInt8 if opts.method == "int8" else QuantType.QFLOAT8E4M3FN
        reader = _Feeds(feeds or [], [i.name for i in model.graph.input])
        quantize_static(model, str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=nodes, per_channel=opts.method == "int8", activation_type=qtype,
                        weight_type=qtype, use_external_data_format=True,
                        # ONNX Runtime takes float8 scales from the activation distribution only
                        calibrate_method=(CalibrationMethod.MinMax if opts.method == "int8"
                                          else CalibrationMethod.Distribution),
                        # TensorRT's placement: Q/DQ on the inputs of the quantized MatMuls only (their outputs stay
                        # float), a pair of its own for each, so another reader of the same tensor (an attention
                        # MatMul, a residual) keeps the float value
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "MatMulConstBOnly": True, "CalibStridedMinMax": 1,
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"], "DedicatedQDQPair": True})


def _int4(model, dst: Path, opts: QuantOptions, nodes: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    fmt = QuantFormat.QOperator if opts.format == "ort" else QuantFormat.QDQ
    config = DefaultWeightOnlyQuantConfig(block_size=opts.block_size, is_symmetric=True,
                                          accuracy_level=opts.accuracy_level or None, quant_format=fmt,
                                          op_types_to_quantize=("MatMul",))
    quant = MatMulNBitsQuantizer(model, nodes_to_include=nodes, algo_config=config)
    quant.process()
    onnx.save_model(quant.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizers print calibration settings to stdout and log advice (pre-processing, skipped
    nodes) through the root logger: none of it is actionable here; progress is reported per stage instead."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def record(opts: QuantOptions, stages: list[str], calibration: CalibrationSet | None,
           modelopt: str | None = None) -> dict:
    """The manifest's "quantization": one place for method, format, bits, block size and calibration hash.
    `modelopt`: the nvidia-modelopt version that made the graphs (format modelopt, as its worker reported it)."""
    import importlib.metadata

    ops = {("int8", "ort"): "DynamicQuantizeLinear + MatMulInteger", ("int4-wo", "ort"): "MatMulNBits",
           ("int8", "qdq"): "QuantizeLinear/DequantizeLinear int8",
           ("int4-wo", "qdq"): "DequantizeLinear int4 (blocked) + MatMul",
           ("fp8", "qdq"): "QuantizeLinear/DequantizeLinear float8e4m3fn",
           ("int8", "modelopt"): "QuantizeLinear/DequantizeLinear int8 (weights stored int8)",
           ("int4-wo", "modelopt"): "DequantizeLinear int4 (blocked) + MatMul",
           ("fp8", "modelopt"): "QuantizeLinear/DequantizeLinear float8e4m3fn (weights stored e4m3fn)",
           }[(opts.method, opts.format)]
    if opts.format == "modelopt":
        from graphs.quantize_modelopt import ALGORITHMS

        if modelopt is None:
            raise internal_error("record: a modelopt quantization without the version that made it")
        algorithm, tool = ALGORITHMS[opts.method], f"nvidia-modelopt {modelopt} (its own environment)"
    else:
        algorithm, tool = None, f"onnxruntime.quantization {importlib.metadata.version('onnxruntime')}"
    int4_scales = "AWQ-clip, searched on the calibration set" if algorithm == "awq_clip" else "round to nearest"
    fp8_scales = "one scale per output channel" if opts.format == "modelopt" else "one scale per tensor"
    return {
        "method": opts.method, "format": opts.format, "bits": BITS[opts.method], "ops": ops,
        "weights": (f"symmetric int4 blocks of {opts.block_size} along K, one scale each ({int4_scales})"
                    if opts.method == "int4-wo" else "symmetric, per output channel" if opts.method == "int8"
                    else f"e4m3fn, {fp8_scales}"),
        "activations": ("float" if opts.method == "int4-wo" else "int8 per call (dynamic)" if opts.format == "ort"
                        else f"{'int8' if opts.method == 'int8' else 'e4m3fn'} per tensor, calibrated"
                        + (f" ({algorithm})" if algorithm else "")),
        "block_size": opts.block_size if opts.method == "int4-wo" else None,
        "accuracy_level": opts.accuracy_level if (opts.method, opts.format) == ("int4-wo", "ort") else None,
        "calibration": None if calibration is None else {
            "sha256": calibration.sha256, "samples": len(calibration.samples), "source": calibration.source},
        "stages": list(stages),
        "tool": tool,
    }


def _quarters(name: str, say: Callable[[str], None], stdout) -> Callable[[int, int], None]:
    """A (done, total) progress callback that reports a stage's weights at each quarter (7B blocks take minutes),
    printing to `stdout` (the caller's, not _quiet()'s)."""
    def report(done: int, total: int) -> None:
        if total >= 8 and done < total and done * 4 // total != (done - 1) * 4 // total:
            with contextlib.redirect_stdout(stdout):
                say(f"quantize:   {name}: {done}/{total} weights")
    return report


def check_precision(opts: QuantOptions, precision: str) -> None:
    """fp16 graphs take the tensor-at-a-time methods (int4-wo, int8 ort) and ModelOpt's (which keeps the graph's
    precision); ONNX Runtime's calibrated Q/DQ ones need fp32."""
    from graphs.quantize_stream import streamable

    if precision != "fp32" and not streamable(opts.method, opts.format) and opts.format != "modelopt":
        raise InputError(f"--quantize {opts.method} --quantize-format {opts.format} calibrates an fp32 graph (ONNX "
                         f"Runtime's quantize_static reads fp32 weights and activations), and this export is "
                         f"{precision}: export with --precision fp32, quantize {precision} with --quantize-format "
                         f"modelopt (NVIDIA ModelOpt), or use --quantize int4-wo or --quantize int8 "
                         f"--quantize-format ort")


def quantize_artifact(art_dir: str | os.PathLike, opts: QuantOptions,
                      calibrate: Callable[[CalibrationSet, list[str]], dict[str, list[dict]]] | None = None,
                      progress: Callable[[str], None] | None = None) -> dict | None:
    """Quantize the LLM stages of a float artifact in place; returns the manifest's quantization record.

    Args:
        art_dir (path): an artifact `csprt export` just wrote (float).
        opts (QuantOptions): the method (resolved here).
        calibrate (callable | None): (calibration set, stage names) -> {stage: [feed, ...]}, the float artifact's
            recorded stage feeds (engines.calibration.calibration_feeds); needed by qdq int8 and fp8 and by every
            modelopt method.
        progress (callable | None): one line per stage. Defaults to silent.
    """
    from graphs import manifest as mf
    from graphs.quantize_modelopt import ALGORITHMS, Block, quantize_graphs_modelopt, row_axes

    say = progress or (lambda _m: None)
    opts = opts.resolved()
    if opts.method == "none":
        return None
    art = Path(art_dir)
    artifact = mf.load_artifact(art)
    manifest = json.loads(json.dumps(artifact.manifest))
    check_precision(opts, artifact.precision)
    if quantization_of(manifest):
        raise ArtifactError(f"{art} is already quantized; re-export it from the checkpoint: {artifact.rebuild_command}")
    stages = llm_stages(manifest)
    calibration = load_calibration(opts.calibration) if opts.needs_calibration else None
    feeds = {}
    if calibration is not None:
        if calibrate is None:
            raise ToolchainError(f"--quantize {opts.method} --quantize-format {opts.format} needs calibration feeds")
        say(f"quantize: calibrating on {len(calibration.samples)} samples ({calibration.source}, "
            f"sha256 {calibration.sha256[:12]})")
        feeds = calibrate(calibration, stages)
        empty = [name for name in stages if not feeds.get(name)]
        if empty:
            raise ToolchainError(f"calibration ran no sample through {', '.join(empty)}; every sample of "
                                 f"{calibration.source} must reach the LLM (a query within the exported text length)")
    mf.invalidate(art)  # from here until the manifest is rewritten, the directory is not an artifact
    versions = set()  # nvidia-modelopt's, as its worker reports it per graph

    def finished(name: str, report: dict) -> None:
        versions.add(report["modelopt"])
        say(f"quantize:   {name}: {report['quantized_nodes']} DequantizeLinear")

    with contextlib.ExitStack() as cleanup:
        made = {}
        if opts.format == "modelopt":  # NVIDIA ModelOpt, whole graphs, one process in its own environment
            work = Path(tempfile.mkdtemp(dir=art / "graphs", prefix=".modelopt."))
            cleanup.callback(shutil.rmtree, work, ignore_errors=True)
            entries = {e["name"]: e for e in manifest["stages"]}
            say(f"quantize: NVIDIA ModelOpt {opts.method} ({ALGORITHMS[opts.method]}) on {', '.join(stages)}")
            made = quantize_graphs_modelopt(
                {n: Block(art / entries[n]["graph"], feeds[n], row_axes(entries[n]["inputs"])) for n in stages},
                work, opts, artifact.precision, done=finished)
        _install(art, manifest, stages, opts, feeds, made, say)
    manifest["quantization"] = record(opts, stages, calibration, modelopt=next(iter(versions), None))
    manifest["export"]["command"] = export_command(manifest["export"]["command"], opts)
    manifest["tolerances"]["end_to_end"] = dict(QUANT_E2E_TOLERANCES[opts.method])
    mf.write_manifest(art, manifest)
    return manifest["quantization"]


def _install(art: Path, manifest: dict, stages: list[str], opts: QuantOptions, feeds: dict, made: dict,
             say: Callable[[str], None]) -> None:
    """Quantize each stage's graph (or take ModelOpt's, `made`) into the artifact, updating its manifest entry."""
    from graphs import manifest as mf
    from graphs import onnx_passes
    from graphs.quantize_stream import quantize_graph_streamed, streamable

    for i, name in enumerate(stages, 1):
        entry = next(e for e in manifest["stages"] if e["name"] == name)
        src = art / entry["graph"]
        before = weight_bytes(src)
        stdout = sys.stdout  # progress goes here while _quiet() holds ONNX Runtime's prints
        tmpdir = Path(tempfile.mkdtemp(dir=src.parent, prefix=f".{name}.quant."))
        try:
            tmp = tmpdir / src.name
            data = tmp.with_name(tmp.name + ".data")
            with _quiet():
                if streamable(opts.method, opts.format):  # a tensor at a time: memory bounded by one weight
                    model = quantize_graph_streamed(src, data, opts, progress=_quarters(name, say, stdout))
                elif name in made:  # ModelOpt's, already written
                    model = onnx_passes.load_graph(made[name])
                    data = made[name].with_name(made[name].name + ".data")
                else:  # calibrated Q/DQ: ONNX Runtime's whole-graph quantize_static
                    quantize_graph(src, tmp, opts, feeds.get(name))
                    model = onnx_passes.load_graph(tmp)
            written = onnx_passes.save_with_external_data(model, src, data)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        entry["files"] = {p.relative_to(art).as_posix(): mf.file_sha256(p)
                          for p in sorted(written, key=lambda p: p.suffix != ".onnx")}
        entry["export_key"] = hashlib.sha256(f"{entry['export_key']}:{opts}".encode()).hexdigest()
        after = weight_bytes(src)
        say(f"quantize: [{i}/{len(stages)}] {name}: {opts.method} ({opts.format}), weights "
            f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")


# --- validation ------------------------------------------------------------------------------------------------

def quantization_basis(manifest: dict) -> str:
    """The tolerance basis `csprt validate` reports for a quantized artifact; "" for a float one."""
    q = quantization_of(manifest)
    if not q:
        return ""
    return (f"quantized {q['method']} ({q['format']}) vs the float reference: quantized stages' statistics "
            f"reported, pass/fail on mask IoU and generated ids")


def report_only(manifest: dict, stage: str, entry: dict) -> dict:
    """A per-stage comparison entry, marked reported-not-judged when `stage` is quantized (its error is the
    quantization's, judged end to end by mask IoU)."""
    if stage_quantization(manifest, stage) != "none":
        return {**entry, "passed": True, "report_only": True}
    return entry


def ort_session_config(manifest: dict, stage: str) -> dict[str, str]:
    """ONNX Runtime session config entries a stage's graph needs: fp8 Q/DQ graphs run with the Q/DQ fusions off
    (ONNX Runtime's CPU fuses Q/DQ + MatMul into QLinearMatMul, which has no float8 kernel; unfused, each
    DequantizeLinear runs and the MatMul computes in fp32: an emulation for validation, not a fast path)."""
    if stage_quantization(manifest, stage).startswith("fp8/"):
        return {"session.disable_quant_qdq": "1"}
    return {}
