"""Models and SAEs: where they come from (hub id, folder, GGUF, tiny random), layer paths, the one hook mechanism."""
