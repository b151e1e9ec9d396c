"""The stage graphs of an artifact: names, I/O, named dims and wiring. The one source of truth.

The exporter names graph inputs and outputs from these specs, `graphs.manifest` writes them into
`manifest.json`, and the `Pipeline` follows their wiring. No model-specific logic sits between
stages: every input names where its tensor comes from.

    host.clip_pixels --> vision --(image_hidden, image_indices, image_embeds, assign)--------+
    host.prefix_ids, host.suffix_ids --> embed --(prefix_embeds, suffix_embeds)--> entry_0 <--+
    entry_i --(hidden, positions, row_lens[, query_rows])--> llm_i --(hidden_out[, row_scores])--> entry_{i+1}.block_hidden ...
    llm_{n-1}.hidden_out (post-norm) --> seg_gather(host.seg_rows, seg_batch) (single-pass) | loop.seg_hidden (generate)
    host.sam_pixels --> sam_encoder --(image_embeddings)--> sam_decoder <-- seg_head <-----+
    generate, after llm_{n-1}: loop of steps  embed(token) -> llm_0 -> ... -> llm_{n-1} -> next_token

Weights once. Every weight lives in exactly one graph: `embed` (embed_tokens), `llm_<i>` (the
decoder layers of schedule stage i; the last one also the final norm and lm_head), `vision`,
`seg_head`, `sam_*`. The entry ops (concatenation and RoPE positions, cluster scatter, prune by
the previous block's scores) are the weightless `entry_<i>` graphs; `seg_gather` is weightless too.
The decode loop's steps (`Loop.steps`) are not graphs of their own: each names the graph it runs
(`StageSpec.graph`), so prefill (many rows, empty cache) and decode (one row) share one graph, one
engine and one loaded session.

Batch. Every graph's leading dim is `batch` (1 to --max-batch): request b is row b everywhere. Static
schedules give every request the same image rows, so a batch is rectangular; the query suffixes are
right-padded (`suffix_lens` [B] gives each request's real length) and every per-request row (the last
prompt row, the [SEG] rows, the prune query, the next position) uses the request's own length. [SEG]
rows are flat over the batch: `seg_rows`/`seg_batch` [num_seg] (single-pass) or the loop's collected
rows, and `seg_head`/`sam_decoder` run once per real mask (mask k decodes image seg_batch[k]).

Static KV cache. A block (`StageSpec.cache`) takes its layers' caches as inputs
`past_{key,value}_<l>` [B, kv_heads, cache_<block>, head_dim], preallocated by the runtime at the
batch's capacity (the block's prefill rows + max_new_tokens - 1, at most the dim's max), plus
`past_len` [B], how many rows of each request's cache are valid, and `row_lens` [B], how many of
this call's rows are real (a prefill: P + budget + S_b; a decode step: 1, or 0 for a request that has
stopped). It attends over the valid rows and the real new rows (causally) and outputs only the new
rows' K/V `{key,value}_<l>` [B, kv_heads, rows_<block>, head_dim]; the runtime writes request b's
rows into its cache at past_len[b] and adds row_lens[b]. The cache is never copied, and one decode
shape (rows 1, the batch's capacity) serves every step.

Layout inside every block: hidden rows are [prefix (P) | image rows (the stage's budget, original
order) | suffix (S)], then generated tokens. Image rows keep their original RoPE positions P + index.

Source strings: "host.<input>", "<stage>.<output>", "loop.<output>" (what the decode loop
collects or feeds: token, position, first_row), "cache" (the runtime's static KV cache and its
length), or a dict {mode: source} where the source differs by mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphs.errors import internal_error
from graphs.schedule import Schedule
from graphs.shapes import ModelShape

DTYPES = ("float32", "float16", "int64")
PRECISIONS = {"fp32": "float32", "fp16": "float16"}
EXPORT_MODES = ("single-pass", "generate", "both")
CACHE_SOURCE = "cache"    # source of a block's cache inputs: the runtime's preallocated buffers
CACHE_LENGTH = "past_len"  # block input [B]: each request's valid cache rows, where this call's rows are written
HOST_STEP_FEED = "feed"    # "<host step>.feed": an input of a stage that host step runs itself (`HostStep.runs`)
ROW_LENS = "row_lens"      # block input [B]: each request's real rows in this call (past_len advances by it)

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
    kind: str               # vision | embed | entry | llm | seg_gather | seg_head | sam_encoder | sam_decoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[int, ...] = ()   # decoder layers (llm stages)
    loop: bool = False             # a decode step (`Loop.steps`), not a graph of its own
    modes: tuple[str, ...] = ("single-pass", "generate")  # modes whose runs include this stage
    skip_if_empty: str = ""        # input name: when it has a zero-size dim, skip and emit empty outputs
    cache: tuple[tuple[str, str], ...] = ()  # (cache input, new-rows output): written at `past_len` (module doc)
    graph: str = ""                # the graph it runs when not its own (decode steps); see `graph_name`

    @property
    def graph_name(self) -> str:
        """The graph file stem graphs/<graph_name>.onnx (and engine) this stage runs."""
        return self.graph or self.name

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
    """Greedy decoding after stage `after` (generate mode), as `exporter.reference` does it.

    tok, hid, pos = prefill's token, hidden, position
    per request b (tok [B], hid [B, H], pos [B]): emit tok[b]; if tok[b] == seg: collect hid[b]; b stops on a
            stop token or its max_new_tokens; when every request has stopped, the loop ends; otherwise
            run `steps` in order (feeds: "loop.token" = tok [B, 1], "loop.position" = pos [B, 1],
            "loop.first_row" = zeros [B, 1], "loop.row_lens" = 1 for a request still decoding, 0 for one that
            stopped [B], "<step>.<output>" of this step, "cache"); tok, hid = token_output, hidden_output; pos += 1
    collects "loop.generated_ids" [B, T] (-1 past a request's end), "loop.seg_hidden" [K, H] and
    "loop.seg_batch" [K] (whose each row is)
    """

    steps: tuple[StageSpec, ...]  # each runs an existing graph (`StageSpec.graph`) on one row
    after: str              # the stage after which the loop runs
    token: str              # "<stage>.<output>" of the first token (prefill)
    hidden: str             # "<stage>.<output>" of the first token's post-norm hidden state
    position: str           # "<stage>.<output>": the position the first fed token takes
    token_output: str       # "<step>.<output>" giving the next token
    hidden_output: str      # "<step>.<output>" giving its post-norm hidden state
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    seg_token_id: int
    max_positions: int = 0  # the model's position limit (RoPE table); 0: unchecked
    max_seg: int | None = None  # the most [SEG] tokens per request (num_seg is the batch's total); None: unchecked
    outputs: tuple[str, ...] = ("generated_ids", "seg_hidden")
    feeds: tuple[str, ...] = ("token", "position", "first_row", "row_lens")  # "loop.<x>" sources the steps read

    @property
    def stage(self) -> str:
        """The name timings and reports use for all decode steps together."""
        return "decode"


@dataclass(frozen=True)
class HostStep:
    """Work the host does between stages, declared so that any host can follow it (docs/artifact.md, "Host steps").

    It runs right before stage `before` (host steps before one stage run in layout order), reads `inputs`
    ("<stage>.<output>", "host.<input>", "<host step>.<output>"; an input whose source a mode lacks is left
    out), and its `outputs` become sources "<name>.<output>". `kind` says what the host does (`params` holds
    the texts, tokenizer files and numbers it needs); `runs` names stages the step runs itself, in a loop of its
    own (they are not in any mode's stage sequence, and their inputs come from "<name>.feed").
    """

    name: str
    kind: str
    before: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    runs: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)

    def output(self, name: str) -> TensorSpec:
        return _named(self.outputs, name, f"host step {self.name!r} output")


@dataclass(frozen=True)
class Layout:
    host_inputs: tuple[TensorSpec, ...]
    stages: tuple[StageSpec, ...]
    dims: dict[str, DimRange]
    modes: tuple[str, ...]
    outputs: dict[str, str | dict[str, str]]  # pipeline result name -> source
    loop: Loop | None = None
    host_steps: tuple[HostStep, ...] = ()  # host work between stages (ACCM's tokenizers and beam loop)

    def host_steps_before(self, stage: str) -> list[HostStep]:
        """The host steps that run right before `stage`, in order."""
        return [h for h in self.host_steps if h.before == stage]

    def run_by_host_steps(self) -> set[str]:
        """Stages a host step runs itself (`HostStep.runs`): in no mode's sequence."""
        return {name for h in self.host_steps for name in h.runs}

    def stage(self, name: str) -> StageSpec:
        """A stage by name; a decode step (`loop.steps`) too."""
        steps = self.loop.steps if self.loop is not None else ()
        return _named((*self.stages, *steps), name, "stage")

    def decodes(self, graph: str) -> bool:
        """True when a decode step (`loop.steps`) runs graph `graph`: its engine gets a decode profile too."""
        return self.loop is not None and any(s.graph_name == graph and s.cache for s in self.loop.steps)

    def graph_stages(self) -> list[StageSpec]:
        """One stage per graph file (the stages themselves: decode steps live in `loop.steps`)."""
        return list(self.stages)

    def sequence(self, mode: str) -> list[StageSpec]:
        """Stages of a `mode` run, in order. In generate mode the loop runs after `loop.after`."""
        if mode not in self.modes:
            raise KeyError(f"mode {mode!r} is not in this artifact; it has: {', '.join(self.modes)}")
        owned = self.run_by_host_steps()
        return [s for s in self.stages if mode in s.modes and s.name not in owned]


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
        opt_prefix (int): typical prefix length (the system prompt's). Defaults to 1.
        opt_suffix (int): typical suffix length. Defaults to 1.
        max_batch (int): the most requests per batch (the `batch` dim of every graph). Defaults to 8.
        opt_batch (int): the batch size TensorRT profiles tune for. Defaults to 0 (min(4, max_batch)).
    """

    precision: str = "fp32"
    mode: str = "single-pass"
    max_text_len: int = 256
    max_new_tokens: int = 64
    max_seg: int = 8
    max_instances: int = 16
    opt_prefix: int = 1
    opt_suffix: int = 1
    max_batch: int = 8
    opt_batch: int = 0  # 0: min(4, max_batch)

    @property
    def batch_range(self) -> "DimRange":
        """The `batch` dim's profile: 1 to max_batch, opt `opt_batch` (0: min(4, max_batch))."""
        return _clamp_opt(1, self.opt_batch or min(4, self.max_batch), self.max_batch)

    @property
    def modes(self) -> tuple[str, ...]:
        return ("single-pass", "generate") if self.mode == "both" else (self.mode,)


def rows_dim(stage: StageSpec) -> str:
    """The named dim of a block's new rows per call ("rows_llm_0"): 1 in a decode step, the prompt in a prefill."""
    if not stage.cache:
        raise internal_error(f"stage {stage.name!r} has no KV cache, hence no rows dim")
    return stage.output(stage.cache[0][1]).shape[2]


def _named(items, name: str, what: str):
    for it in items:
        if it.name == name:
            return it
    raise KeyError(f"no {what} {name!r}; have: {', '.join(i.name for i in items)}")


def _clamp_opt(lo: int, opt: int, hi: int) -> DimRange:
    return DimRange(lo, min(max(opt, lo), hi), hi)


def build_layout(schedule: Schedule, shape: ModelShape, opts: LayoutOptions, seg_token_id: int,
                 stop_token_ids: tuple[int, ...], accm=None) -> Layout:
    """Every stage's I/O, the wiring between them and the named dims' profiles.

    Args:
        schedule (Schedule): resolved against `shape`.
        shape (ModelShape): the model.
        opts (LayoutOptions): precision, modes and bounds.
        seg_token_id (int): the tokenizer's [SEG] id (the decode loop collects hidden states there).
        stop_token_ids (tuple[int, ...]): ids that end generation (EOS).
        accm (graphs.accm_layout.AccmLayoutInfo | None): an ACCM schedule's model sizes and token ids; its
            graphs replace `vision` and its host steps splice the caption into the suffix (graphs/accm_layout.py).
            Defaults to None.
    """
    if (schedule.accm is not None) != (accm is not None):
        raise internal_error("build_layout: an ACCM schedule needs its AccmLayoutInfo, and only an ACCM schedule")
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

    B = "batch"  # every graph's leading dim: requests batched together (1 to --max-batch)
    host = [
        TensorSpec("clip_pixels", f, (B, 3, v.image_size, v.image_size)),
        TensorSpec("sam_pixels", f, (B, 3, sam.image_size, sam.image_size)),
        # The template prefix is the same for every request (tiled); the query suffix is right-padded to the
        # batch's longest, with each request's real length in suffix_lens: padding never reaches a real row.
        TensorSpec("prefix_ids", "int64", (B, "prefix_len")),
        TensorSpec("suffix_ids", "int64", (B, "suffix_len")),
        TensorSpec("suffix_lens", "int64", (B,)),
    ]
    if single:
        # The [SEG] rows of the whole batch, flat: the suffix row just before each [SEG] token and the request it
        # belongs to (`seg_batch`, ascending). Flat rather than [B, max_seg]: seg_head and the SAM decoder run
        # once per real mask (no padded masks decoded), a batch without any [SEG] skips them (num_seg 0), and the
        # host knows the rows from its tokenisation, so K stays an input dim (no data-dependent NonZero).
        host.append(TensorSpec("seg_rows", "int64", ("num_seg",)))
        host.append(TensorSpec("seg_batch", "int64", ("num_seg",)))
    if seg_first:
        host.append(TensorSpec("instance_masks", f, (B, "instances", v.grid, v.grid)))
    dims = {
        B: opts.batch_range,
        "prefix_len": _clamp_opt(1, opts.opt_prefix, opts.max_text_len),
        "suffix_len": _clamp_opt(1, opts.opt_suffix, opts.max_text_len),
        "num_seg": DimRange(1, 1, opts.max_seg * opts.max_batch),  # the batch's total
    }
    if seg_first:
        dims["instances"] = DimRange(1, 1, opts.max_instances)
    by_name = {t.name: t for t in host}
    # Where the LLM side reads the image rows and the prompt's ids: the vision graph and the host, or for ACCM
    # its picks graph and its caption splice (a host step).
    wire = {"image_hidden": "vision.image_hidden", "image_indices": "vision.image_indices",
           "suffix_ids": "host.suffix_ids", "suffix_lens": "host.suffix_lens", "seg_rows": "host.seg_rows"}
    accm_part = None
    if accm is not None:
        from graphs.accm_layout import accm_layout_part

        accm_part = accm_layout_part(schedule, shape, opts, accm, by_name)
        wire.update(accm_part.sources)
        dims.update(accm_part.dims)

    vision_in = [TensorSpec("clip_pixels", f, by_name["clip_pixels"].shape, "host.clip_pixels")]
    if seg_first:
        vision_in.append(TensorSpec("instance_masks", f, by_name["instance_masks"].shape, "host.instance_masks"))
    vision_out = [
        TensorSpec("image_embeds", f, (B, n, h)),                 # all N projected tokens
        TensorSpec("image_hidden", f, (B, first.budget, h)),      # the first stage's tokens
        TensorSpec("image_indices", "int64", (B, first.budget)),  # their original indices, ascending
    ]
    if first.op == "cluster":
        vision_out.append(TensorSpec("assign", "int64", (B, n)))  # each token's representative (position in indices)
    stages = [StageSpec("vision", "vision", tuple(vision_in), tuple(vision_out))] if accm_part is None else [
        *accm_part.image_stages]
    stages.append(StageSpec(
        "sam_encoder", "sam_encoder", (TensorSpec("sam_pixels", f, by_name["sam_pixels"].shape, "host.sam_pixels"),),
        (TensorSpec("image_embeddings", f, (B, sam.out_chans, sam.embed_grid, sam.embed_grid)),)))

    if accm_part is not None:
        stages += accm_part.query_stages
    kv = lambda t: (B, llm.kv_heads, t, hd)  # noqa: E731  [B, kv_heads, T, head_dim]
    text = ("prefix_len", "suffix_len")
    stages.append(StageSpec(
        "embed", "embed", (TensorSpec("prefix_ids", "int64", (B, "prefix_len"), "host.prefix_ids"),
                           TensorSpec("suffix_ids", "int64", (B, "suffix_len"), wire["suffix_ids"])),
        (TensorSpec("prefix_embeds", f, (B, "prefix_len", h)), TensorSpec("suffix_embeds", f, (B, "suffix_len", h)))))
    n_stages = len(schedule.stages)
    blocks: list[StageSpec] = []
    for i, st in enumerate(schedule.stages):
        last = i == n_stages - 1
        scores = not last and schedule.stages[i + 1].op == "prune"  # this block ranks image rows for the next
        entry, block = f"entry_{i}", st.name
        rows, cache = f"rows_{block}", f"cache_{block}"
        qdim = rows if schedule.prune_query == "mean" else 1  # every row, or the one query row
        b_in = first.budget if i == 0 else schedule.stages[i - 1].budget
        if i == 0:
            ins = [TensorSpec("prefix_embeds", f, (B, "prefix_len", h), "embed.prefix_embeds"),
                   TensorSpec("suffix_embeds", f, (B, "suffix_len", h), "embed.suffix_embeds"),
                   TensorSpec("image_hidden", f, (B, b_in, h), wire["image_hidden"]),
                   TensorSpec("image_indices", "int64", (B, b_in), wire["image_indices"])]
        else:
            prev = schedule.stages[i - 1].name
            ins = [TensorSpec("block_hidden", f, (B, f"rows_{prev}", h), f"{prev}.hidden_out"),
                   TensorSpec("image_indices", "int64", (B, b_in), f"entry_{i - 1}.image_indices_out")]
            if st.op == "scatter":
                ins += [TensorSpec("image_embeds", f, (B, n, h), "vision.image_embeds"),
                        TensorSpec("assign", "int64", (B, n), "vision.assign")]
            elif st.op == "prune":
                ins.append(TensorSpec("row_scores", "float32", (B, f"rows_{prev}"), f"{prev}.row_scores"))
        # P and S (and the [SEG] query) come from the ids themselves: entry graphs carry no weights.
        ins += [TensorSpec(name, "int64", (B, dim), wire.get(name, f"host.{name}"))
                for name, dim in zip(("prefix_ids", "suffix_ids"), text)
                if i > 0 or name == "suffix_ids" and scores]
        ins.append(TensorSpec("suffix_lens", "int64", (B,), wire["suffix_lens"]))
        outs = [TensorSpec("hidden", f, (B, rows, h)), TensorSpec("positions", "int64", (B, rows)),
                TensorSpec("image_indices_out", "int64", (B, st.budget)),
                TensorSpec("row_lens", "int64", (B,))]  # each request's real rows: P + budget + its suffix length
        if scores:
            outs.append(TensorSpec("query_rows", "int64", (B, qdim)))
        if i == 0:
            outs.append(TensorSpec("next_position", "int64", (B,)))  # P + N + S_b: each first generated token's
        stages.append(StageSpec(entry, "entry", tuple(ins), tuple(outs)))

        b_ins = [TensorSpec("hidden", f, (B, rows, h), f"{entry}.hidden"),
                 TensorSpec("positions", "int64", (B, rows), f"{entry}.positions"),
                 TensorSpec("row_lens", "int64", (B,), f"{entry}.row_lens")]
        if scores:
            b_ins.append(TensorSpec("query_rows", "int64", (B, qdim), f"{entry}.query_rows"))
        b_ins.append(TensorSpec(CACHE_LENGTH, "int64", (B,), CACHE_SOURCE))
        b_outs = [TensorSpec("hidden_out", f, (B, rows, h))]  # the last block's rows are post-norm
        pairs = []
        for layer in st.layers:
            for k in ("key", "value"):
                b_ins.append(TensorSpec(f"past_{k}_{layer}", f, kv(cache), CACHE_SOURCE))
                b_outs.append(TensorSpec(f"{k}_{layer}", f, kv(rows)))  # this call's rows only
                pairs.append((f"past_{k}_{layer}", f"{k}_{layer}"))
        if scores:
            b_outs.append(TensorSpec("row_scores", "float32", (B, rows)))  # softmax attention paid to each row
        if last:
            b_outs += [TensorSpec("next_token", "int64", (B,)), TensorSpec("last_hidden", f, (B, h))]
        blocks.append(StageSpec(block, "llm", tuple(b_ins), tuple(b_outs), layers=tuple(st.layers),
                                cache=tuple(pairs)))
        stages.append(blocks[-1])
        t_max = 2 * opts.max_text_len + st.budget
        dims[rows] = _clamp_opt(1, opts.opt_prefix + st.budget + opts.opt_suffix, t_max)
        dims[cache] = _clamp_opt(1, opts.opt_prefix + st.budget + opts.opt_suffix + opts.max_new_tokens,
                                 t_max + (opts.max_new_tokens if generate else 0))
    last_llm = blocks[-1].name

    loop = None
    if generate:
        # A decode step embeds each request's token ([B, 1] as both id inputs) and feeds its suffix row on.
        steps = [StageSpec("step_embed", "embed", (TensorSpec("prefix_ids", "int64", (B, "prefix_len"), "loop.token"),
                                                    TensorSpec("suffix_ids", "int64", (B, "suffix_len"), "loop.token")),
                           stages[[s.name for s in stages].index("embed")].outputs, graph="embed", loop=True,
                           modes=("generate",))]
        for b in blocks:
            src = {"hidden": f"{steps[-1].name}.{'suffix_embeds' if len(steps) == 1 else 'hidden_out'}",
                   "positions": "loop.position", "query_rows": "loop.first_row", "row_lens": "loop.row_lens"}
            ins = tuple(TensorSpec(t.name, t.dtype, t.shape, src.get(t.name, t.source)) for t in b.inputs)
            steps.append(StageSpec(f"step_{b.name}", "llm", ins, b.outputs, layers=b.layers, cache=b.cache,
                                   graph=b.name, loop=True, modes=("generate",)))
        loop = Loop(steps=tuple(steps), after=last_llm, token=f"{last_llm}.next_token",
                    hidden=f"{last_llm}.last_hidden", position="entry_0.next_position",
                    token_output=f"{steps[-1].name}.next_token", hidden_output=f"{steps[-1].name}.last_hidden",
                    max_new_tokens=opts.max_new_tokens, stop_token_ids=tuple(stop_token_ids),
                    seg_token_id=seg_token_id, max_positions=llm.max_positions, max_seg=opts.max_seg,
                    outputs=("generated_ids", "seg_hidden", "seg_batch"))

    seg_src: dict[str, str] = {}
    batch_src: dict[str, str] = {}
    if single:
        stages.append(StageSpec(
            "seg_gather", "seg_gather",
            (TensorSpec("hidden", f, (B, f"rows_{last_llm}", h), f"{last_llm}.hidden_out"),
             TensorSpec("suffix_ids", "int64", (B, "suffix_len"), wire["suffix_ids"]),
             TensorSpec("seg_rows", "int64", ("num_seg",), wire["seg_rows"]),
             TensorSpec("seg_batch", "int64", ("num_seg",), "host.seg_batch")),
            (TensorSpec("seg_hidden", f, ("num_seg", h)),),  # final post-norm rows before each [SEG]
            modes=("single-pass",), skip_if_empty="seg_rows"))
        seg_src["single-pass"] = "seg_gather.seg_hidden"
        batch_src["single-pass"] = "host.seg_batch"
    if generate:
        seg_src["generate"] = "loop.seg_hidden"
        batch_src["generate"] = "loop.seg_batch"
    stages.append(StageSpec(
        "seg_head", "seg_head", (TensorSpec("seg_hidden", f, ("num_seg", h), _one_or_dict(seg_src)),),
        (TensorSpec("seg_embeddings", f, ("num_seg", shape.out_dim)),), skip_if_empty="seg_hidden"))
    g4 = 4 * sam.embed_grid
    stages.append(StageSpec(
        "sam_decoder", "sam_decoder",
        (TensorSpec("image_embeddings", f, (B, sam.out_chans, sam.embed_grid, sam.embed_grid),
                    "sam_encoder.image_embeddings"),
         TensorSpec("seg_embeddings", f, ("num_seg", shape.out_dim), "seg_head.seg_embeddings"),
         TensorSpec("seg_batch", "int64", ("num_seg",), _one_or_dict(batch_src))),  # each mask's image
        (TensorSpec("low_res_masks", f, ("num_seg", g4, g4)),
         TensorSpec("masks", f, ("num_seg", sam.image_size, sam.image_size))),  # upsampled to the padded input
        skip_if_empty="seg_embeddings"))

    outputs: dict[str, str | dict[str, str]] = {
        "masks": "sam_decoder.masks", "low_res_masks": "sam_decoder.low_res_masks",
        "seg_embeddings": "seg_head.seg_embeddings", "seg_batch": _one_or_dict(batch_src),
    }
    if generate:
        outputs["generated_ids"] = "loop.generated_ids"
    if accm_part is not None:
        outputs.update(accm_part.outputs)
    return Layout(host_inputs=tuple(host), stages=tuple(stages), dims=dims, modes=modes, outputs=outputs, loop=loop,
                  host_steps=accm_part.host_steps if accm_part is not None else ())


def _one_or_dict(sources: dict[str, str]) -> str | dict[str, str]:
    values = set(sources.values())
    return values.pop() if len(values) == 1 else dict(sources)
