"""The train stage: the LDM autoencoder objective under accelerate, checkpoints, curves."""
