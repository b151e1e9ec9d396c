"""A client for `csprt serve` (KServe v2 over HTTP or gRPC with Triton's `tritonclient`); copy it freely.

    python -m tools.triton_client --image cat.jpg --query "Where is the cat?" [--url 127.0.0.1:8000]
        [--protocol http|grpc] [--mode single-pass|generate] [--logits] [--out DIR]

Sends the encoded file as it is (the server decodes it) and writes DIR/mask.png, the same bytes as
`csprt run`'s mask.png. Needs only numpy and tritonclient[http,grpc].
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MODEL = "csprt"
OUTPUTS = ("mask_png", "masks_packed", "masks_shape", "answer", "generated_ids", "timings", "host_steps")


def client_module(protocol: str):
    """tritonclient.http or tritonclient.grpc."""
    if protocol == "http":
        import tritonclient.http as mod
    elif protocol == "grpc":
        import tritonclient.grpc as mod
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return mod


def _bytes_input(mod, name: str, value: bytes):
    t = mod.InferInput(name, [1, 1], "BYTES")  # [batch 1, one element]
    t.set_data_from_numpy(np.array([[value]], dtype=object))
    return t


def segment(client, mod, image: bytes, query: str, mode: str = "single-pass", return_logits: bool = False,
            timeout_s: float | None = None) -> dict:
    """One request. Raises tritonclient.utils.InferenceServerException with the server's message on a bad request.

    Args:
        client: a tritonclient.http or .grpc InferenceServerClient.
        mod: the module `client` comes from (tritonclient.http or tritonclient.grpc).
        image (bytes): an encoded JPEG/PNG/WebP file.
        query (str): the question.
        mode (str): "single-pass" or "generate". Defaults to "single-pass".
        return_logits (bool): also fetch mask_logits. Defaults to False.
        timeout_s (float | None): gRPC call timeout. Defaults to None (none).

    Returns:
        dict: mask_png (bytes), masks (bool [K, H, W]), mask_logits (float32 [K, H, W] or None), answer (str),
        generated_ids (list[int]), timings_ms (dict), host_steps (dict: what the artifact's host steps report,
        e.g. {"accm": {candidates, chosen, caption, ...}}; empty for an artifact without host steps).
    """
    inputs = [_bytes_input(mod, "image", image), _bytes_input(mod, "query", query.encode("utf-8")),
              _bytes_input(mod, "mode", mode.encode())]
    flag = mod.InferInput("return_logits", [1, 1], "BOOL")
    flag.set_data_from_numpy(np.array([[return_logits]], dtype=bool))
    inputs.append(flag)
    names = OUTPUTS + (("mask_logits",) if return_logits else ())
    outputs = [mod.InferRequestedOutput(n) for n in names]
    # grpc takes a timeout per call; an http client has one for all calls (InferenceServerClient network_timeout)
    kwargs = {"client_timeout": timeout_s} if timeout_s is not None and mod.__name__ == "tritonclient.grpc" else {}
    res = client.infer(MODEL, inputs, outputs=outputs, **kwargs)
    # Outputs with no elements are left out: masks_packed and mask_logits when K = 0, generated_ids in single-pass,
    # host_steps for an artifact without host steps.
    k, h, w = (int(v) for v in res.as_numpy("masks_shape")[0])
    packed, logits, ids = res.as_numpy("masks_packed"), res.as_numpy("mask_logits"), res.as_numpy("generated_ids")
    steps = res.as_numpy("host_steps")
    masks = np.zeros((k, h, w), bool) if packed is None else np.unpackbits(packed[0], count=k * h * w).reshape(k, h, w)
    return {
        "mask_png": bytes(res.as_numpy("mask_png")[0, 0]),
        "masks": masks.astype(bool),
        "mask_logits": np.zeros((k, h, w), np.float32) if return_logits and logits is None else
        (None if logits is None else logits[0]),
        "answer": bytes(res.as_numpy("answer")[0, 0]).decode("utf-8"),
        "generated_ids": [] if ids is None else ids[0].tolist(),
        "timings_ms": json.loads(bytes(res.as_numpy("timings")[0, 0])),
        "host_steps": {} if steps is None else json.loads(bytes(steps[0, 0])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.triton_client", description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--query", required=True)
    p.add_argument("--url", default=None, help="host:port. Defaults to 127.0.0.1:8000 (http) or :8001 (grpc).")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http", help="Defaults to http.")
    p.add_argument("--mode", choices=("single-pass", "generate"), default="single-pass")
    p.add_argument("--logits", action="store_true", help="also fetch mask_logits, saved as DIR/mask_logits.npy")
    p.add_argument("--out", type=Path, default=Path("out"), help="Defaults to ./out.")
    args = p.parse_args(argv)

    from tritonclient.utils import InferenceServerException

    mod = client_module(args.protocol)
    url = args.url or ("127.0.0.1:8000" if args.protocol == "http" else "127.0.0.1:8001")
    client = mod.InferenceServerClient(url)
    try:
        r = segment(client, mod, args.image.read_bytes(), args.query, args.mode, args.logits)
    except InferenceServerException as e:
        print(f"triton_client: error: {e.message()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mask.png").write_bytes(r["mask_png"])
    if r["mask_logits"] is not None:
        np.save(args.out / "mask_logits.npy", r["mask_logits"])
    print(f"answer: {r['answer']!r}  [SEG] masks: {len(r['masks'])}  mask area: {int(r['masks'].any(0).sum())} px  "
          f"-> {args.out / 'mask.png'}")
    print("timings (ms): " + ", ".join(f"{k} {v:g}" for k, v in r["timings_ms"].items()))
    if "accm" in r["host_steps"]:
        accm = r["host_steps"]["accm"]
        print(f"caption (candidate {accm['chosen']} of {len(accm['candidates'])}): {accm['caption']!r}")
    if r["host_steps"]:
        (args.out / "host_steps.json").write_text(json.dumps(r["host_steps"], indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
