"""Either kind of model file behind one interface, for the stages after selection (evaluate, export):
`.module` (nn.Module on normalised NCHW), `.spec`, `.classes`, `.kind` ("head" | "finetuned" |
"scratch"), `.metadata()` (what the ONNX carries about it), `.parameters()` and
`.logits(paths, shas, runtime, cache_dir, batch_size)` and `.probabilities(...)` (their softmax)."""

from __future__ import annotations

from pathlib import Path

from headstart.scratch import MODEL_FORMAT as SCRATCH_FORMAT
from headstart.scratch import ScratchModel, load_scratch
from headstart.training import TrainedModel, read_model_file, transfer_model


def load_model(path: str | Path) -> TrainedModel | ScratchModel:
    """The model in `path`: a transfer model (headstart.training's file) or a from-scratch one."""
    state = read_model_file(path, "run the select stage first")
    if state.get("format") == SCRATCH_FORMAT:
        return load_scratch(state, str(path))
    return transfer_model(state, Path(path))
