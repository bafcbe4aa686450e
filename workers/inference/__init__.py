"""The pieces of batched classification (engine, item loading, scoring); `workers.infer` is the entry point."""
