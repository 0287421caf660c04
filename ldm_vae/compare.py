"""Channel comparison: PSNR / SSIM (and LPIPS / rFID when on) against latent channel count, and the
rate-distortion plane (rate: KL to the prior in bits per pixel; distortion: PSNR), one point a run.

The runs are DVC experiments (``dvc exp run -S model.latent_channels=8``) and the workspace;
their params and headline metrics come from ``dvc exp show --json``, the rest from each run's
``details.json`` as git holds it in the run's commit, so the report shows what ``dvc exp show``
does and more, as a table and a plot a person can read at a glance. The reference VAEs a
run scored (``evaluate.references``) are rows of their own, ``ref:<name>``.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

from .viz import pyplot, save_figure

COLUMNS = ["run", "latent_channels", "kl_weight", "codebook_size", "compression_ratio", "psnr", "ssim", "mse",
           "rate_bpp", "rate_entropy_bpp", "codebook_usage", "codebook_perplexity", "latent_hf_share", "image_hf_share",
           "denoise_loss", "psnr_fp32", "psnr_bicubic", "lpips", "rfid", "collapsed_channels", "num_images"]
METRICS_FILE = "data/eval/metrics.json"  # the headline (evaluation.HEADLINE's short names)
PROBE_FILE = "data/probe/metrics.json"  # the denoising probe's (its own stage)
DETAILS = {METRICS_FILE: "data/eval/details.json", PROBE_FILE: "data/probe/details.json"}  # every number
FULL_NAMES = {
    "fp16_db": "psnr_fp16_cost",
    "hf_share": "latent_hf_share",
    "collapsed": "collapsed_channels",
    "denoise": "denoise_loss",
    "usage": "codebook_usage",
    "perplexity": "codebook_perplexity",
}  # headline -> details names (evaluation.HEADLINE, probe.py)


def experiment_runs(repo: Path, commits: int = 1) -> list[dict]:
    """One row per run that has evaluation metrics (workspace, commits, experiments), from the
    experiments of HEAD and, with ``commits`` > 1, of the commits before it (``dvc exp show -n``:
    a commit made after a sweep leaves its experiments on the commit they ran from)."""
    cmd = ["dvc", "exp", "show", "--json"] + (["-n", str(commits)] if commits > 1 else [])
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {proc.stderr.strip()[-500:]}")
    return runs_from_exp_show(json.loads(proc.stdout or "[]"), lambda rev, path: _details(repo, rev, path))


def _details(repo: Path, rev: str, path: str) -> dict:
    """A run's details.json: the workspace's file, or the one git holds in the run's commit."""
    if rev == "workspace":
        file = Path(repo) / path
        return json.loads(file.read_text()) if file.is_file() else {}
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def runs_from_exp_show(shown, details=None) -> list[dict]:
    """Rows from ``dvc exp show --json`` output (walked generically: the nesting differs by version).
    ``details(rev, path)``: that run's details.json beside a metrics file ({} when there is none)."""
    rows, seen = [], set()
    for entry in _records(shown):
        data = entry.get("data") or {}
        shown_metrics = data.get("metrics") or {}
        rev = str(entry.get("rev", "?"))

        def full(file: str) -> dict | None:
            headline = (shown_metrics.get(file) or {}).get("data")
            if not headline:
                return None
            more = details(rev, DETAILS[file]) if details is not None else {}
            return {**{FULL_NAMES.get(k, k): v for k, v in headline.items()}, **more}

        metrics, probe = full(METRICS_FILE), full(PROBE_FILE) or {}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        if not metrics or "psnr" not in metrics:
            continue
        channels = metrics.get("latent_channels") or (params.get("model") or {}).get("latent_channels")
        vq = "codebook_size" in metrics  # a VQ run: no KL weight, its codebook instead
        row = {"run": entry.get("name") or (rev if rev == "workspace" else rev[:7]), "latent_channels": channels,
               "kl_weight": None if vq else (params.get("loss") or {}).get("kl_weight")}
        row.update({k: metrics[k] for k in COLUMNS[3:] if k in metrics})
        if probe.get("denoise_loss") is not None:  # (tokens: the probe does not apply)
            row["denoise_loss"] = probe["denoise_loss"]
            if "denoise_levels" in probe:
                row["denoise_levels"] = probe["denoise_levels"]
        ident = (channels, round(float(metrics["psnr"]), 6), round(float(metrics.get("ssim", 0)), 6))
        if ident in seen:  # the workspace is usually also a commit or an experiment
            continue
        seen.add(ident)
        rows.append(row)
        rows += [r for r in reference_rows(metrics) if (r["run"], r["psnr"]) not in seen]
        seen.update((r["run"], r["psnr"]) for r in rows)
    return sorted(rows, key=lambda r: (r["latent_channels"], r["run"]))


def rows_from_csv(path: Path) -> list[dict]:
    """The rows of an earlier report's channels.csv (numbers as numbers, empty cells left out)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if v in ("", None):
                    continue
                try:
                    row[k] = int(v) if re.fullmatch(r"-?\d+", v) and k != "run" else (float(v) if k != "run" else v)
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def reference_rows(metrics: dict) -> list[dict]:
    """A row per reference VAE a run scored (``evaluate.references``): run ``ref:<name>``, at its
    own channel count and compression ratio."""
    rows = []
    for key in sorted(metrics):
        if key.startswith("latent_channels_"):
            name = key[len("latent_channels_"):]
            row = {"run": f"ref:{name}", "latent_channels": metrics[key],
                   "compression_ratio": metrics.get(f"compression_ratio_{name}")}
            row.update({m: metrics[f"{m}_{name}"] for m in ("psnr", "ssim", "lpips") if f"{m}_{name}" in metrics})
            if "psnr_bicubic" in metrics:
                row["psnr_bicubic"] = metrics["psnr_bicubic"]
            rows.append(row)
    return rows


def _records(node):
    if isinstance(node, dict):
        if "rev" in node and isinstance(node.get("data"), dict):
            yield node
        for value in node.values():
            yield from _records(value)
    elif isinstance(node, list):
        for value in node:
            yield from _records(value)


def write_report(rows: list[dict], out: Path) -> None:
    """channels.csv (the numbers), channels.md (a table) and channels.png under ``out``."""
    if not rows:
        raise RuntimeError(f"no run has {METRICS_FILE}: run `dvc repro` or `dvc exp run` first")
    out.mkdir(parents=True, exist_ok=True)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    with open(out / "channels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({c: _fmt(r.get(c)) for c in cols} for r in rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(_fmt(r.get(c))) for c in cols) + " |" for r in rows]
    (out / "channels.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "channels.png")


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    everything, rows = rows, [r for r in rows if "codebook_size" not in r]  # by channel count: KL runs
    panels = [m for m in ("psnr", "ssim", "lpips", "rfid") if any(m in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    channels = sorted({r["latent_channels"] for r in rows})
    ratio = {r["latent_channels"]: r.get("compression_ratio") for r in rows}
    labels = [f"{c}\n({ratio[c]:.0f}:1)" if ratio[c] else str(c) for c in channels]
    for ax, m in zip(axes[0], panels):
        xs = [r["latent_channels"] for r in rows if m in r]
        ax.plot(xs, [r[m] for r in rows if m in r], "o", label="run")
        best = {c: [r[m] for r in rows if m in r and r["latent_channels"] == c] for c in channels}
        pick = min if m in ("lpips", "rfid") else max
        ax.plot([c for c in channels if best[c]], [pick(best[c]) for c in channels if best[c]], "-", alpha=0.6,
                label="best per channel count")
        if m == "psnr" and any("psnr_bicubic" in r for r in rows):
            ax.axhline(rows[0]["psnr_bicubic"], color="grey", ls="--", lw=1, label="8x resize baseline")
        ax.set_xscale("log", base=2)
        ax.set_xticks(channels, labels)
        ax.set(xlabel="latent channels (compression)", title=m.upper() + (" (lower is better)" if pick is min else ""))
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    if any("rate_bpp" in r for r in everything):
        _plot_rate_distortion(everything, path.with_name("rate_distortion.png"))
    probed = {f"{r['run']}: {r['latent_channels']}ch, beta {r.get('kl_weight')}": r
              for r in rows if "denoise_levels" in r}
    if probed:
        from .probe import save_denoise_plot  # here: torch and diffusers only when a run was probed

        save_denoise_plot(probed, path.with_name("denoise.png"))


def _plot_rate_distortion(rows: list[dict], path: Path) -> None:
    """The ELBO's two terms, one point per run: rate (KL to the prior, bits per pixel) against
    distortion (PSNR), labelled with channels and KL weight."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    mine = [r for r in rows if "rate_bpp" in r and "psnr" in r]
    kl = [r for r in mine if "codebook_size" not in r]
    vq = [r for r in mine if "codebook_size" in r]
    xs, ys = [r["rate_bpp"] for r in kl], [r["psnr"] for r in kl]
    if kl and all("denoise_loss" in r for r in kl):  # the third side of the choice, as colour
        dots = ax.scatter(xs, ys, c=[r["denoise_loss"] for r in kl], cmap="viridis_r", zorder=3)
        fig.colorbar(dots, ax=ax, label="denoising loss (lower: easier to diffuse)")
    elif kl:
        ax.plot(xs, ys, "o")
    if vq:  # tokens: log2 K bits a position (squares), and what an entropy coder would spend (open)
        ax.plot(
            [r["rate_bpp"] for r in vq], [r["psnr"] for r in vq], "s", color="tab:red", label="VQ: log2 K", zorder=3
        )
        ent = [r for r in vq if "rate_entropy_bpp" in r]
        ax.plot([r["rate_entropy_bpp"] for r in ent], [r["psnr"] for r in ent], "s", mfc="none", color="tab:red",
                label="VQ: code entropy")
        ax.legend(fontsize=7, loc="lower right")
    for r in mine:
        what = (f"K {r['codebook_size']}, {100 * r.get('codebook_usage', 0):.0f}% used" if "codebook_size" in r
                else f"{r['latent_channels']}ch, beta {r.get('kl_weight')}")
        ax.annotate(f"{r['run']}: {what}", (r["rate_bpp"], r["psnr"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    base = [r["psnr_bicubic"] for r in mine if "psnr_bicubic" in r]
    if base:
        ax.axhline(base[0], color="grey", ls="--", lw=1, label="8x resize baseline")
        ax.legend(fontsize=7, loc="lower right")
    ax.margins(x=0.3, y=0.1)  # room for the labels
    ax.set(xlabel="rate, bits per image pixel: KL to N(0, I); VQ: per token", ylabel="distortion: PSNR (dB)",
           title="rate against distortion (up and left is better)")
    fig.tight_layout()
    save_figure(fig, path)


def _fmt(v):
    """Floats to 4 decimals, small ones (a KL weight of 1e-6) to 3 significant digits."""
    if isinstance(v, float):
        return float(f"{v:.3g}") if 0 < abs(v) < 0.01 else round(v, 4)
    return "" if v is None else v
