"""Data preparation: loaders for every source format and the prep job that writes a dataset artifact."""
