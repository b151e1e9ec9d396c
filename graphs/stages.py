"""The stage graphs of an artifact: names, I/O, named dims and wiring. The one source of truth.

The exporter names graph inputs and outputs from these specs, `graphs.manifest` writes them into
`manifest.json`, and the `Pipeline` follows their wiring. No model-specific logic sits between
stages: every input names where its tensor comes from.

    host.clip_pixels --> vision --(image_hidden, image_indices, image_embeds, assign)--+
    host.prefix_ids, host.suffix_ids ---------------------------------------------------+--> llm_0 --> ... --> llm_{n-1}
                        seg_gather(suffix rows at host.seg_rows) (single-pass) or loop.seg_hidden (generate)
    host.sam_pixels --> sam_encoder --(image_embeddings)--+                                    |
                                                          +--> sam_decoder <-- seg_head <-----+
    generate: llm_{n-1}.(next_token, next_position, last_hidden) + every llm_i.present_* --> loop over `decode`

Layout inside every LLM stage: hidden rows are [prefix (P) | image rows (the stage's budget, original
order) | suffix (S)], carried between stages as three tensors so P and S stay named dims. Image
rows keep their original RoPE positions P + index.

Source strings: "host.<input>", "<stage>.<output>", or "loop.<output>" (what the decode loop
collects); a dict {mode: source} where the source differs by mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphs.errors import internal_error
from graphs.schedule import Schedule
from graphs.shapes import ModelShape

DTYPES = ("float32", "float16", "int64")
PRECISIONS = {"fp32": "float32", "fp16": "float16"}
EXPORT_MODES = ("single-pass", "generate", "both")

Dim = int | str  # an int is static; a str is a named dynamic dim (a key of `dims`) or an expression of them


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str              # one of DTYPES
    shape: tuple[Dim, ...]  # e.g. (1, "prefix_len", 4096)
    source: str | dict[str, str] = ""  # inputs only: where the tensor comes from (see module doc)

    def source_for(self, mode: str) -> str:
        return self.source[mode] if isinstance(self.source, dict) else self.source


@dataclass(frozen=True)
class StageSpec:
    name: str               # graph file graphs/<name>.onnx; reused verbatim in engines, reports, tests
    kind: str               # vision | llm | seg_gather | seg_head | sam_encoder | sam_decoder | decode
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[int, ...] = ()   # decoder layers (llm and decode stages)
    loop: bool = False             # run by the decode loop, where the sequence reaches it
    modes: tuple[str, ...] = ("single-pass", "generate")  # modes whose runs include this stage
    skip_if_empty: str = ""        # input name: when it has a zero-size dim, skip and emit empty outputs

    def input(self, name: str) -> TensorSpec:
        return _named(self.inputs, name, f"stage {self.name!r} input")

    def output(self, name: str) -> TensorSpec:
        return _named(self.outputs, name, f"stage {self.name!r} output")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Loop:
    """Greedy decoding over the `decode` stage, as `exporter.reference` does it.

    tok, hid = prefill's next_token, last_hidden
    repeat: emit tok; if tok == seg: collect hid; stop on tok in stop_token_ids or max_new_tokens;
            run decode with inputs from `carry` (first step: from the inputs' own sources); tok, hid = its outputs
    """

    stage: str
    token: str              # "<stage>.<output>" of the first token (prefill)
    hidden: str             # "<stage>.<output>" of the first token's post-norm hidden state
    token_output: str       # decode output giving the next token
    hidden_output: str      # decode output giving its post-norm hidden state
    carry: dict[str, str]   # decode input -> decode output feeding it on the next step
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    seg_token_id: int
    outputs: tuple[str, ...] = ("generated_ids", "seg_hidden")


@dataclass(frozen=True)
class Layout:
    host_inputs: tuple[TensorSpec, ...]
    stages: tuple[StageSpec, ...]
    dims: dict[str, DimRange]
    modes: tuple[str, ...]
    outputs: dict[str, str | dict[str, str]]  # pipeline result name -> source
    loop: Loop | None = None

    def stage(self, name: str) -> StageSpec:
        return _named(self.stages, name, "stage")

    def sequence(self, mode: str) -> list[StageSpec]:
        """Stages of a `mode` run, in order. A `loop` stage there means: run the decode loop now."""
        if mode not in self.modes:
            raise KeyError(f"mode {mode!r} is not in this artifact; it has: {', '.join(self.modes)}")
        return [s for s in self.stages if mode in s.modes]


@dataclass(frozen=True)
class LayoutOptions:
    """Export-time bounds. Profiles (min/opt/max) of the named dims come from these.

    Args:
        precision (str): "fp32" or "fp16"; float I/O and weights use it. Defaults to "fp32".
        mode (str): "single-pass", "generate" or "both". Defaults to "single-pass".
        max_text_len (int): the most text tokens either side of the image. Defaults to 256.
        max_new_tokens (int): generate-mode decode limit. Defaults to 64.
        max_seg (int): the most [SEG] tokens per request. Defaults to 8.
        max_instances (int): the most instance masks (cluster_method seg_first). Defaults to 16.
        max_step (int): the most tokens per decode step. Defaults to 1.
        opt_prefix (int): typical prefix length (the system prompt's). Defaults to 1.
        opt_suffix (int): typical suffix length. Defaults to 1.
    """

    precision: str = "fp32"
    mode: str = "single-pass"
    max_text_len: int = 256
    max_new_tokens: int = 64
    max_seg: int = 8
    max_instances: int = 16
    max_step: int = 1
    opt_prefix: int = 1
    opt_suffix: int = 1

    @property
    def modes(self) -> tuple[str, ...]:
        return ("single-pass", "generate") if self.mode == "both" else (self.mode,)


def _named(items, name: str, what: str):
    for it in items:
        if it.name == name:
            return it
    raise KeyError(f"no {what} {name!r}; have: {', '.join(i.name for i in items)}")


def _clamp_opt(lo: int, opt: int, hi: int) -> DimRange:
    return DimRange(lo, min(max(opt, lo), hi), hi)


def build_layout(schedule: Schedule, shape: ModelShape, opts: LayoutOptions, seg_token_id: int,
                 stop_token_ids: tuple[int, ...]) -> Layout:
    """Every stage's I/O, the wiring between them and the named dims' profiles.

    Args:
        schedule (Schedule): resolved against `shape`.
        shape (ModelShape): the model.
        opts (LayoutOptions): precision, modes and bounds.
        seg_token_id (int): the tokenizer's [SEG] id (the decode loop collects hidden states there).
        stop_token_ids (tuple[int, ...]): ids that end generation (EOS).
    """
    if opts.precision not in PRECISIONS:
        raise internal_error(f"precision {opts.precision!r} not in {tuple(PRECISIONS)}")
    if opts.mode not in EXPORT_MODES:
        raise internal_error(f"mode {opts.mode!r} not in {EXPORT_MODES}")
    f = PRECISIONS[opts.precision]
    modes = opts.modes
    single, generate = "single-pass" in modes, "generate" in modes
    v, llm, sam = shape.vision, shape.llm, shape.sam
    n, h, hd = shape.num_image_tokens, llm.hidden, llm.hidden // llm.heads
    first = schedule.stages[0]
    seg_first = first.op == "cluster" and schedule.cluster_method == "seg_first"

    host = [
        TensorSpec("clip_pixels", f, (1, 3, v.image_size, v.image_size)),
        TensorSpec("sam_pixels", f, (1, 3, sam.image_size, sam.image_size)),
        TensorSpec("prefix_ids", "int64", ("prefix_len",)),
        TensorSpec("suffix_ids", "int64", ("suffix_len",)),
    ]
    if single:
        # Rows of the suffix just before each [SEG] token (single-pass): the host knows them from its
        # tokenisation, and as an input K stays a named dim (no data-dependent NonZero in the graphs).
        host.append(TensorSpec("seg_rows", "int64", ("num_seg",)))
    if seg_first:
        host.append(TensorSpec("instance_masks", f, ("instances", v.grid, v.grid)))
    dims = {
        "prefix_len": _clamp_opt(1, opts.opt_prefix, opts.max_text_len),
        "suffix_len": _clamp_opt(1, opts.opt_suffix, opts.max_text_len),
        "num_seg": DimRange(1, 1, opts.max_seg),
    }
    if seg_first:
        dims["instances"] = DimRange(1, 1, opts.max_instances)

    vision_in = [TensorSpec("clip_pixels", f, host[0].shape, "host.clip_pixels")]
    if seg_first:
        vision_in.append(TensorSpec("instance_masks", f, host[-1].shape, "host.instance_masks"))
    vision_out = [
        TensorSpec("image_embeds", f, (n, h)),                 # all N projected tokens
        TensorSpec("image_hidden", f, (1, first.budget, h)),   # the first stage's tokens
        TensorSpec("image_indices", "int64", (first.budget,)),  # their original indices, ascending
    ]
    if first.op == "cluster":
        vision_out.append(TensorSpec("assign", "int64", (n,)))  # each token's representative (position in indices)
    stages = [StageSpec("vision", "vision", tuple(vision_in), tuple(vision_out))]
    stages.append(StageSpec(
        "sam_encoder", "sam_encoder", (TensorSpec("sam_pixels", f, host[1].shape, "host.sam_pixels"),),
        (TensorSpec("image_embeddings", f, (1, sam.out_chans, sam.embed_grid, sam.embed_grid)),)))

    kv = lambda t: (1, llm.kv_heads, t, hd)  # noqa: E731  [1, kv_heads, T, head_dim]
    prev = "vision"
    for i, st in enumerate(schedule.stages):
        last = i == len(schedule.stages) - 1
        next_prunes = not last and schedule.stages[i + 1].op == "prune"
        if i == 0:
            ins = [TensorSpec("prefix_ids", "int64", ("prefix_len",), "host.prefix_ids"),
                   TensorSpec("suffix_ids", "int64", ("suffix_len",), "host.suffix_ids")]
        else:
            ins = [TensorSpec("prefix_hidden", f, (1, "prefix_len", h), f"{prev}.prefix_hidden_out"),
                   TensorSpec("suffix_hidden", f, (1, "suffix_len", h), f"{prev}.suffix_hidden_out")]
            if next_prunes and schedule.prune_query == "seg":
                ins.append(TensorSpec("suffix_ids", "int64", ("suffix_len",), "host.suffix_ids"))
        b_in = first.budget if i == 0 else schedule.stages[i - 1].budget
        sfx = "" if i == 0 else "_out"
        ins += [TensorSpec("image_hidden", f, (1, b_in, h), f"{prev}.image_hidden{sfx}"),
                TensorSpec("image_indices", "int64", (b_in,), f"{prev}.image_indices{sfx}")]
        if st.op == "scatter":
            ins += [TensorSpec("image_embeds", f, (n, h), "vision.image_embeds"),
                    TensorSpec("assign", "int64", (n,), "vision.assign")]
        elif st.op == "prune":
            ins.append(TensorSpec("image_scores", "float32", (b_in,), f"{prev}.image_scores"))
        # "_out": ONNX value names are unique, so an output cannot share its input's name.
        outs = [TensorSpec("prefix_hidden_out", f, (1, "prefix_len", h)),
                TensorSpec("image_hidden_out", f, (1, st.budget, h)),
                TensorSpec("suffix_hidden_out", f, (1, "suffix_len", h)),
                TensorSpec("image_indices_out", "int64", (st.budget,))]
        if next_prunes:
            outs.append(TensorSpec("image_scores", "float32", (st.budget,)))  # softmax attention paid to each image row
        if last and generate:
            outs += [TensorSpec("next_token", "int64", (1,)), TensorSpec("last_hidden", f, (1, h)),
                     TensorSpec("next_position", "int64", (1,))]
        if generate:
            t = f"prefix_len + {st.budget} + suffix_len"
            for layer in st.layers:
                outs += [TensorSpec(f"present_key_{layer}", f, kv(t)), TensorSpec(f"present_value_{layer}", f, kv(t))]
        stages.append(StageSpec(st.name, "llm", tuple(ins), tuple(outs), layers=tuple(st.layers)))
        prev = st.name
    last_llm = prev

    loop = None
    if generate:
        dec_in = [TensorSpec("token_ids", "int64", ("step_len",), f"{last_llm}.next_token"),
                  TensorSpec("position", "int64", (1,), f"{last_llm}.next_position")]
        dec_out = [TensorSpec("next_token", "int64", (1,)), TensorSpec("last_hidden", f, (1, h)),
                   TensorSpec("next_position", "int64", (1,))]
        carry = {"token_ids": "next_token", "position": "next_position"}
        dims["step_len"] = DimRange(1, 1, opts.max_step)
        for st in schedule.stages:
            past = f"past_{st.name}"
            typical = opts.opt_prefix + st.budget + opts.opt_suffix + opts.max_new_tokens // 2
            dims[past] = _clamp_opt(1, typical, 2 * opts.max_text_len + st.budget + opts.max_new_tokens)
            for layer in st.layers:
                for kind in ("key", "value"):
                    dec_in.append(TensorSpec(f"past_{kind}_{layer}", f, kv(past), f"{st.name}.present_{kind}_{layer}"))
                    dec_out.append(TensorSpec(f"present_{kind}_{layer}", f, kv(f"{past} + step_len")))
                    carry[f"past_{kind}_{layer}"] = f"present_{kind}_{layer}"
        stages.append(StageSpec("decode", "decode", tuple(dec_in), tuple(dec_out),
                                layers=tuple(range(llm.layers)), loop=True, modes=("generate",)))
        loop = Loop(stage="decode", token=f"{last_llm}.next_token", hidden=f"{last_llm}.last_hidden",
                    token_output="next_token", hidden_output="last_hidden", carry=carry,
                    max_new_tokens=opts.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                    seg_token_id=seg_token_id)

    seg_src: dict[str, str] = {}
    if single:
        stages.append(StageSpec(
            "seg_gather", "seg_gather",
            (TensorSpec("suffix_hidden", f, (1, "suffix_len", h), f"{last_llm}.suffix_hidden_out"),
             TensorSpec("seg_rows", "int64", ("num_seg",), "host.seg_rows")),
            (TensorSpec("seg_hidden", f, ("num_seg", h)),),  # final post-norm rows before each [SEG]
            modes=("single-pass",), skip_if_empty="seg_rows"))
        seg_src["single-pass"] = "seg_gather.seg_hidden"
    if generate:
        seg_src["generate"] = "loop.seg_hidden"
    stages.append(StageSpec(
        "seg_head", "seg_head", (TensorSpec("seg_hidden", f, ("num_seg", h), _one_or_dict(seg_src)),),
        (TensorSpec("seg_embeddings", f, ("num_seg", shape.out_dim)),), skip_if_empty="seg_hidden"))
    g4 = 4 * sam.embed_grid
    stages.append(StageSpec(
        "sam_decoder", "sam_decoder",
        (TensorSpec("image_embeddings", f, (1, sam.out_chans, sam.embed_grid, sam.embed_grid), "sam_encoder.image_embeddings"),
         TensorSpec("seg_embeddings", f, ("num_seg", shape.out_dim), "seg_head.seg_embeddings")),
        (TensorSpec("low_res_masks", f, ("num_seg", g4, g4)),
         TensorSpec("masks", f, ("num_seg", sam.image_size, sam.image_size))),  # upsampled to the padded input
        skip_if_empty="seg_embeddings"))

    outputs: dict[str, str | dict[str, str]] = {
        "masks": "sam_decoder.masks", "low_res_masks": "sam_decoder.low_res_masks",
        "seg_embeddings": "seg_head.seg_embeddings",
    }
    if generate:
        outputs["generated_ids"] = "loop.generated_ids"
    return Layout(host_inputs=tuple(host), stages=tuple(stages), dims=dims, modes=modes, outputs=outputs, loop=loop)


def _one_or_dict(sources: dict[str, str]) -> str | dict[str, str]:
    values = set(sources.values())
    return values.pop() if len(values) == 1 else dict(sources)
