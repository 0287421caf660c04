"""verify's advice (ldm_vae/verify.py): which command brings each kind of damaged file back. The
damage itself, found and repaired through real DVC, is test_e2e.py's."""

from pathlib import Path

from ldm_vae.verify import Damage, Expected, remedies


def _damage(path: str, stage: str, out: str, cache: str | None = None, cache_ok: bool = False, what="x"):
    return Damage(Expected(Path(path), "0" * 32, stage, out), what, Path(cache) if cache else None, cache_ok)


def test_each_damaged_file_gets_the_way_back_that_works_for_it():
    damaged = [
        _damage("data/raw/manifest.jsonl", "download", "data/raw", "/c/17/e2", cache_ok=True, what="missing"),
        _damage("data/prepared/val/v.tar", "prepare", "data/prepared", "/c/96/aa"),  # cache object damaged too
        _damage("data/eval/metrics.json", "evaluate", "data/eval/metrics.json"),  # cache: false, in git
        _damage("data/latents/train/t.tar", "encode", "data/latents"),  # no cache copy at all
    ]
    in_git = {Path("data/eval/metrics.json")}
    assert remedies(damaged, remotes=False, in_git=in_git) == [
        "rm -f /c/96/aa", "rm -f data/prepared/val/v.tar", "git checkout -- data/eval/metrics.json",
        "rm -f data/latents/train/t.tar", "dvc checkout -f data/raw", "dvc repro -f -s prepare",
        "dvc repro -f -s encode", "dvc repro   # then the stages downstream, if their inputs came out different"]
    with_remote = remedies(damaged, remotes=True, in_git=in_git)
    assert with_remote[-2:] == ["dvc pull -f data/prepared", "dvc pull -f data/latents"]
    assert not any(line.startswith("dvc repro") for line in with_remote)
