"""ldm-vae: an image collection to latents ready for latent-diffusion training (see README.md
and docs/design.md).

For diffusion trainers, the public API is here at the top::

    from ldm_vae import latent_loader, decode_latents, load_vae
    from ldm_vae import token_loader, decode_tokens      # VQ latents (model.regularizer: vq)

The package mirrors ``dvc.yaml``: one sub-package per stage (``ingest`` for download and prepare,
``train``, ``encode``, ``evaluate``) above a ground floor that several stages share (``config``,
``shards``, ``runner``, ``launch``, ``images``, ``data``, ``model``, ``export``, ``lpips``,
``metrics``, ``viz``); ``loader`` and ``token_batches`` sit on top. Imports only run downwards.

The names below are imported on first use: a stage that only reads params (and must fail within a
second on a wrong one) never pays for torch here.
"""

_API = {"latent_loader": "loader", "latent_dataset": "loader", "decode_latents": "loader", "load_vae": "export",
        "token_loader": "token_batches", "decode_tokens": "token_batches"}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ldm_vae' has no attribute {name!r}")
