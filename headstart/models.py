"""Either kind of model file behind one interface, for the stages after selection (evaluate, export):
`.module` (nn.Module on normalised NCHW), `.spec`, `.classes`, `.kind` ("head" | "finetuned" |
"scratch"), `.metadata()` (what the ONNX carries about it), `.parameters()` and
`.probabilities(paths, shas, runtime, cache_dir, batch_size)`."""

from __future__ import annotations

from pathlib import Path

import torch

from headstart import HeadstartError
from headstart.scratch import MODEL_FORMAT as SCRATCH_FORMAT
from headstart.scratch import ScratchModel, load_scratch
from headstart.training import TrainedModel
from headstart.training import load_model as load_transfer


def load_model(path: str | Path) -> TrainedModel | ScratchModel:
    """The model in `path`: a transfer model (headstart.training's file) or a from-scratch one."""
    path = Path(path)
    if not path.is_file():
        raise HeadstartError(f"model file {path} does not exist; run the select stage first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HeadstartError(f"{path}: not a headstart model file ({type(exc).__name__})") from None
    if isinstance(state, dict) and state.get("format") == SCRATCH_FORMAT:
        return load_scratch(state, str(path))
    return load_transfer(path)
