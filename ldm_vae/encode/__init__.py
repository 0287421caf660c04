"""The encode stage: every prepared image to its posterior (mean, std) in latent shards."""
