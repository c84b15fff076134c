"""Serving a CorrSteer export with vLLM: a plugin (no fork, no patched files) that steers per request.

`pip install -e ".[serve]"`, then `CORRSTEER_STEERING=<export folder> vllm serve <model> --dtype float32`.
The plugin's pieces, each loaded by vLLM through an entry point in every process that needs it:

- `plugin.register` (`vllm.general_plugins`): loads and checks the export, swaps the served architecture's model
  class for one that adds the vectors (`model.py`), checks the served model's config and forces eager mode
  (`checks.py`), and keys prefix-cache blocks by the steering that computed them (`prefix.py`);
- `rows.SteeringRequests` (`vllm.logits_processors`): validates each request's steering arguments (`requests.py`;
  a bad one is an HTTP 400) and tracks which row of the running batch holds which request, so that the model adds
  the vector at each request's steered positions only. It never changes logits.

See docs/serving.md.
"""
