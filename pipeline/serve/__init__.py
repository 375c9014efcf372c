"""An OpenAI-compatible server for an exported model: `python -m pipeline.serve MODEL --port 8000`.

The story: resolve MODEL to a Hugging Face directory (`pipeline.export_hf` writes one for a run) -> load it with
transformers (`engine.load`) -> an `Engine` thread batches concurrent requests into the model's batched generation ->
the FastAPI app (`api.py`) validates requests, decodes images and streams answers, and serves the chat page at `/`.
"""
