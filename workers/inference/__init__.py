"""The pieces of batched classification (engine, item loading, scoring); `workers.inference.classify` is the entry point."""
