"""The download and prepare stages: sources (folders, hf datasets, URL lists) to raw shards, raw
shards to square prepared crops."""
