"""Decode ms per step on ONNX Runtime CPU (one thread), 64 steps, no stop token; works on schema 1 and 2 artifacts.
usage: bench_decode.py ART OUT.json [requests]"""
import json, sys, time, dataclasses
import numpy as np
from engines.session import ArtifactSession
from exporter.export import sample_image

art, out = sys.argv[1], sys.argv[2]
reqs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
STEPS = 65  # 64 decode steps after the prefill's token
with ArtifactSession(art, threads=1) as s:
    pipe = s.pipeline
    lay = pipe.layout
    pipe.layout = dataclasses.replace(lay, loop=dataclasses.replace(lay.loop, stop_token_ids=()))
    lay.dims["num_seg"] = type(lay.dims["num_seg"])(1, 1, 1000)
    if hasattr(pipe, "kv"):
        pipe.kv.layout = pipe.layout
    per = []
    real = pipe.chain.infer
    loop_names = {"decode"} | {st.name for st in getattr(lay.loop, "steps", ())}
    first = "step_embed" if "step_embed" in loop_names else "decode"
    def infer(stage, runner, feed, timings):
        t0 = time.perf_counter()
        o = real(stage, runner, feed, timings)
        dt = 1e3 * (time.perf_counter() - t0)
        if stage.name in loop_names:
            if stage.name == first:
                cur.append(0.0)
            cur[-1] += dt
        return o
    pipe.chain.infer = infer
    feed, _ = s.host.inputs(sample_image(), "What is in the picture?", "generate")
    for r in range(reqs + 1):
        cur = []
        res = pipe.run(feed, "generate", max_new_tokens=STEPS)
        if r:
            per.append(cur)
    per = np.array(per)  # [reqs, 64]
    med = np.median(per, axis=0)
    rep = {"art": art, "steps": int(per.shape[1]), "median_ms_step": {k: float(med[k - 1]) for k in (1, 16, 64)},
           "median_ms_all": float(np.median(per)), "ids": res.generated_ids}
    print(json.dumps({k: v for k, v in rep.items() if k != "ids"}))
    json.dump(rep, open(out, "w"))
