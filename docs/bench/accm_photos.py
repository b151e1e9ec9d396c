"""ACCM through the exported artifact vs AccmReference: 5 real photos (scikit-image's) x 5 questions.

For each pair: the artifact's pipeline (ArtifactSession, ONNX Runtime, the host steps as `csprt run` runs them) and
the PyTorch reference (exporter.accm.reference.AccmReference) on the checkpoint the artifact was exported from;
counts equal picks, equal candidate GPT-2 ids, equal chosen caption, and the mask IoU.

usage: python docs/bench/accm_photos.py ART [OUT.json]
       (ART from: csprt make-tiny T --weights fp32 --accm && csprt export T --schedule accm-36 --accm T/accm --out ART)
"""
import json
import sys

import numpy as np
from skimage import data

from engines.compare import mask_iou
from engines.session import ArtifactSession
from exporter.accm.checkpoint import load_accm
from exporter.accm.reference import AccmReference
from exporter.checkpoint import load_checkpoint

PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
          "motorcycle": lambda: data.stereo_motorcycle()[0]}
QUESTIONS = ["Where is the cat?", "What is the person holding?", "Which object is on the table?",
             "What is in the sky?", "Where can I sit?"]

art = sys.argv[1]
with ArtifactSession(art) as session:
    m = session.artifact.manifest
    lisa = load_checkpoint(m["export"]["checkpoint"], m["export"]["vision_tower"])
    accm = load_accm(m["export"]["accm"])
    ref = AccmReference(lisa.model, lisa.tokenizer, lisa.image_processor_config, session.artifact.schedule, accm)
    rows = []
    for name, photo in PHOTOS.items():
        image = photo()
        for q in QUESTIONS:
            got = session.segment(image, q)
            want = ref(image, q)
            g, w = got.host_steps["accm"], want.accm
            rows.append({"photo": name, "question": q, "picks_equal": g["picks"] == w.picks.sorted_indices,
                         "ids_equal": g["candidate_ids"] == [list(i) for i in w.candidate_ids],
                         "chosen_equal": g["chosen"] == w.chosen and g["caption"] == w.caption,
                         "caption": g["caption"],
                         "mask_iou": float(mask_iou(got.masks.any(0), want.masks.any(0)))})
            print(json.dumps(rows[-1]), flush=True)
summary = {"pairs": len(rows), **{k: sum(r[k] for r in rows) for k in ("picks_equal", "ids_equal", "chosen_equal")},
           "min_mask_iou": min(r["mask_iou"] for r in rows)}
print(json.dumps(summary))
if len(sys.argv) > 2:
    with open(sys.argv[2], "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
