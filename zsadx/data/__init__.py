"""Datasets: catalog, raw-layout converters, synthetic downloads, shards and loaders."""
