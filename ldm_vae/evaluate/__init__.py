"""The evaluate stage: reconstruction metrics, latent health, perceptual metrics, channel comparison."""
