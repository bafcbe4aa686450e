"""The OpenAI-compatible surface under /v1: Files, Batches, Fine-tuning, Models, chat and completions.

Each object is a view of newslora's own jobs, files and models (one store, one set of queues and workers):
a batch is a classify job, a fine-tuning job a prep + train pipeline, a fine-tuned model an adapter. Errors
are in OpenAI's shape (`errors.py`), so the official `openai` SDK maps them to its exceptions.
"""
