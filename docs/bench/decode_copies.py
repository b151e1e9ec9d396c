"""Bytes moved per decode step outside the kernels on ONNX Runtime CPU. usage: copies.py ART"""
import json, sys, dataclasses
import numpy as np
from engines.session import ArtifactSession
from exporter.export import sample_image

with ArtifactSession(sys.argv[1], threads=1) as s:
    pipe = s.pipeline
    lay = pipe.layout
    pipe.layout = dataclasses.replace(lay, loop=dataclasses.replace(lay.loop, stop_token_ids=()))
    lay.dims["num_seg"] = type(lay.dims["num_seg"])(1, 1, 1000)
    new = hasattr(pipe, "kv")
    if new:
        pipe.kv.layout = pipe.layout
    loop_names = {"decode"} | {st.name for st in getattr(lay.loop, "steps", ())}
    steps = []
    real = pipe.chain.infer
    def infer(stage, runner, feed, timings):
        out = real(stage, runner, feed, timings)
        if stage.name in loop_names:
            if stage.name in ("decode", "step_embed"):
                steps.append(dict.fromkeys(("cache_in_copied", "cache_out", "cache_written", "other_in", "cache_bytes"),
                                           0))
            st = steps[-1]
            if new:
                c = getattr(runner, "last_copied", {})
                st["cache_in_copied"] += c.get("cache", 0)
                st["other_in"] += c.get("inputs", 0)
                if stage.cache:
                    st["cache_written"] += sum(out[o].nbytes for _, o in stage.cache)
                    st["cache_bytes"] += sum(pipe.kv.buffers[stage.graph_name][i].nbytes for i, _ in stage.cache)
            else:  # schema 1: the whole cache goes in by value and comes back grown, as new arrays
                past = sum(v.nbytes for k, v in feed.items() if k.startswith("past_"))
                st["cache_in_copied"] += past
                st["cache_out"] += sum(v.nbytes for k, v in out.items() if k.startswith("present_"))
                st["other_in"] += sum(v.nbytes for k, v in feed.items() if not k.startswith("past_"))
                st["cache_bytes"] += past
        return out
    pipe.chain.infer = infer
    feed, _ = s.host.inputs(sample_image(), "What is in the picture?", "generate")
    pipe.run(feed, "generate", max_new_tokens=65)
    pick = {k: steps[k - 1] for k in (1, 16, 64)}
    print(json.dumps({"art": sys.argv[1], "steps": len(steps), "per_step": pick}))
