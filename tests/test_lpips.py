"""LPIPS in plain torch: the published weight files load, the distance behaves, missing weights
fail with the way to get them. (The real VGG weights need the network; these tests write files in
the published formats and key names instead.)"""

import pytest
import torch

from ldm_vae import lpips as lp


def _publish(folder, vgg_seed=0):
    """Files shaped and named like torchvision's vgg16-397923af.pth and lpips' v0.1 vgg.pth."""
    torch.manual_seed(vgg_seed)
    net = lp.LPIPS()
    vgg = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file also holds the classifier
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(vgg, folder / lp.VGG_FILE)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(lp.TAP_CHANNELS)},
               folder / lp.LIN_FILE)
    return net


def test_published_files_load_and_distance_behaves(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    src = _publish(lp.weights_dir())
    net = lp.load_lpips("loss.perceptual_weight", download=False)
    for a, b in zip(src.features.state_dict().values(), net.features.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.allclose(net(x, x), torch.zeros(3))
    near, far = net(x, (x + 0.05 * torch.randn_like(x)).clamp(-1, 1)), net(x, torch.rand_like(x) * 2 - 1)
    assert (near > 0).all() and (far > near).all()
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training  # stays in eval mode inside a model put in training mode


def test_missing_weights_fail_at_once_naming_the_param_and_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None)  # no lpips package either
    with pytest.raises(lp.WeightsUnavailable) as e:
        lp.require_weights("loss.perceptual_weight", download=False)
    msg = str(e.value)
    for part in ("loss.perceptual_weight", lp.VGG_FILE, lp.LIN_FILE, "python -m ldm_vae.lpips", str(lp.weights_dir())):
        assert part in msg


def test_train_stage_with_lpips_but_no_weights_exits_in_seconds(pipeline_dir, tmp_path):
    import subprocess
    import sys
    import time

    import yaml

    from helpers.common import ROOT, TINY

    raw = {k: dict(v) for k, v in TINY.items()}
    raw["loss"] = {"perceptual_weight": 1.0}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**__import__("os").environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "stages/train.py"), "--params", str(tmp_path / "params.yaml"),
                           "--prepared", str(pipeline_dir / "prepared"), "--vae", str(tmp_path / "vae"),
                           "--logs", str(tmp_path / "logs"), "--checkpoints", str(tmp_path / "ck")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and time.perf_counter() - t0 < 30
    assert "loss.perceptual_weight" in proc.stderr and lp.VGG_FILE in proc.stderr
    assert not (tmp_path / "vae").exists() and not (tmp_path / "logs").exists()


def test_downloads_are_kept_only_with_the_published_hash(tmp_path, monkeypatch):
    import hashlib

    from helpers.httpserver import ImageServer, Route

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(lp.importlib.util, "find_spec", lambda name: None)
    good_vgg, good_lin = b"vgg weights" * 100, b"lin weights" * 10
    vgg_name = f"vgg16-{hashlib.sha256(good_vgg).hexdigest()[:8]}.pth"  # torch hub's naming
    server = ImageServer()
    try:
        server.routes["/vgg.pth"] = Route(b"<html>a proxy's login page</html>")
        server.routes["/lin.pth"] = Route(good_lin)
        monkeypatch.setattr(lp, "VGG_FILE", vgg_name)
        monkeypatch.setattr(lp, "VGG_URL", f"{server.url}/vgg.pth")
        monkeypatch.setattr(lp, "LIN_URL", f"{server.url}/lin.pth")
        monkeypatch.setattr(lp, "LIN_SHA256", hashlib.sha256(good_lin).hexdigest())
        with pytest.raises(ValueError, match="does not match the expected"):
            lp.fetch_weights()
        assert sorted(p.name for p in lp.weights_dir().iterdir()) == []  # nothing kept, no .part left
        server.routes["/vgg.pth"] = Route(good_vgg)
        lp.fetch_weights()
        assert (lp.weights_dir() / vgg_name).read_bytes() == good_vgg
        assert (lp.weights_dir() / lp.LIN_FILE).read_bytes() == good_lin
        assert lp.missing_weights() == []
    finally:
        server.close()
