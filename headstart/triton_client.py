"""Ask a Triton server for a headstart model's answers, with the same preprocessing and the same
abstention rule as `headstart predict`: the contract travels in the model's config (`parameters`),
headstart.runtime.Contract preprocesses each image and makes the answer from the logits Triton returns.

    pip install "tritonclient[http]" headstart   # headstart's runtime: onnxruntime, numpy, Pillow
    python client.py --url localhost:8000 --model NAME image.png more/*.jpg

export-triton copies this file into the model's folder as client.py. One JSON object per image:
label, confidence, probabilities, abstain and reason (or error, for a file that cannot be read)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from headstart.runtime import Contract

_NUMPY = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8}


def contract_from_config(config: dict, source: str = "triton") -> Contract:
    """The Contract in a served config's `parameters` (GET v2/models/<name>/config)."""
    params = config.get("parameters") or {}
    meta = {k: v.get("string_value", "") for k, v in params.items() if isinstance(v, dict)}
    return Contract.from_metadata(source, meta)


def classify(
    paths: list[str], model: str, url: str = "localhost:8000", abstain: bool = True, client=None, http=None
):
    """Answers for `paths`, in batches of the model's max_batch_size. `http` is tritonclient.http (or
    a stand-in with its API) and `client` an InferenceServerClient of it; both made from `url` by default."""
    if http is None:
        import tritonclient.http as http
    client = client or http.InferenceServerClient(url)
    config = client.get_model_config(model)
    contract = contract_from_config(config, f"{url}/{model}")
    inp, out = config["input"][0], config["output"][0]
    # the feature gate's score travels as a second output (dims [1] per image), when the rule has it
    ood = contract.rule.ood if contract.rule is not None else None
    names = [out["name"]] + ([ood["output"]] if ood else [])
    dtype = inp["data_type"].removeprefix("TYPE_")
    step = max(1, int(config.get("max_batch_size") or 1))
    answers: list[dict] = [{} for _ in paths]
    pixels = {}
    for i, p in enumerate(paths):
        try:
            pixels[i] = contract.load(p)
        except Exception as exc:  # unreadable, truncated, not an image: that file's answer says so
            answers[i] = {"error": f"{type(exc).__name__}: {exc}"}
    loaded = list(pixels)
    for start in range(0, len(loaded), step):
        rows = loaded[start : start + step]
        batch = np.stack([pixels[i] for i in rows]).astype(_NUMPY[dtype])
        x = http.InferInput(inp["name"], list(batch.shape), dtype)
        x.set_data_from_numpy(batch)
        result = client.infer(model, [x], outputs=[http.InferRequestedOutput(o) for o in names])
        score = result.as_numpy(names[1]).reshape(-1) if len(names) > 1 else None
        for i, a in zip(rows, contract.decide(result.as_numpy(out["name"]), abstain, score), strict=True):
            answers[i] = a
    return [{"path": str(p), **a} for p, a in zip(paths, answers, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+")
    ap.add_argument("--model", required=True, help="the model's name in the repository")
    ap.add_argument("--url", default="localhost:8000", help="Triton's HTTP endpoint (default localhost:8000)")
    ap.add_argument("--no-abstain", action="store_true", help="the raw argmax, never 'I don't know'")
    args = ap.parse_args(argv)
    answers = classify(args.images, args.model, args.url, not args.no_abstain)
    for a in answers:
        print(json.dumps({k: v for k, v in a.items() if v is not None}))
    return 1 if any("error" in a for a in answers) else 0


if __name__ == "__main__":
    sys.exit(main())
