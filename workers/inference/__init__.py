"""The pieces of batched classification (the adapter ref, the engine, item loading, scoring);
`workers.inference.classify` is the entry point."""
