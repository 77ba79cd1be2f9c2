"""The analogue of SPDInv's Table 1 on the toy world: every inversion method x {P2P, MasaCtrl}.

On the fixed edit set of atelier.toyworld.edit_bench (32 edits of 12 source scenes: colour,
shape, background, add and remove object), each source is inverted once per method and each
edit sampled with each engine, as each method's own pipeline does it (atelier.inversion.recipes;
P2P with the SPDInv script's preset for every method, MasaCtrl with its defaults), then scored:
background PSNR / MSE / SSIM outside the edit region, structure distance, edit success and
alignment by the world evaluator, inversion time and UNet evaluations. Seeds are fixed.

    make bench-inversion            # or: .venv/bin/python bench/bench_inversion_table.py [--steps 25]

Writes docs/benchmarks/inversion.md, docs/benchmarks/inversion_*.png and a JSON of every row.
On a shared machine the work may be split by source scene into processes and merged:
    bench_inversion_table.py --shard 0/3 & ... --shard 2/3; bench_inversion_table.py --merge 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from atelier.core.control import CallControl
from atelier.core.models import ModelRegistry
from atelier.inversion.editing import edit
from atelier.inversion.inversion import DDIM_CHAIN_METHODS, invert
from atelier.toyworld import edit_bench
from atelier.toyworld.evaluator import load_evaluator

METHODS = ("ddim", "npi", "proxnpi", "nti", "directinv", "fixed_point", "spdinv")
ENGINES = ("p2p", "masactrl")
LABELS = {"ddim": "DDIM", "npi": "NPI", "proxnpi": "ProxNPI", "nti": "NTI", "directinv": "DirectInv",
          "fixed_point": "Fixed point (AIDI-style)", "spdinv": "SPDInv"}
ROOT = Path(__file__).resolve().parents[1]


def invert_all(model, edits, methods, steps: int, guidance: float) -> dict[tuple[int, str], object]:
    """(source_id, method) -> InversionOutput. The DDIM-chain methods share one DDIM run (same chain
    and cost); NTI adds its embedding optimisation to its own DDIM run."""
    inversions = {}
    for edit_ in edits:
        if any((edit_.source_id, m) in inversions for m in methods):
            continue
        print(f"inverting source {edit_.source_id}", flush=True)
        image = edit_.source_tensor()
        ddim = None
        for method in methods:
            if method in DDIM_CHAIN_METHODS and method != "nti":
                if ddim is None:
                    ddim = invert(model, image, edit_.source_prompt, method="ddim", steps=steps)
                inversions[(edit_.source_id, method)] = ddim
            else:
                inversions[(edit_.source_id, method)] = invert(model, image, edit_.source_prompt, method=method,
                                                               steps=steps, guidance_scale=guidance)
    return inversions


def run_table(model, evaluator, edits, methods=METHODS, engines=ENGINES, steps: int = 25,
              guidance: float = 2.5) -> list[dict]:
    """One row per (edit, method, engine)."""
    inversions = invert_all(model, edits, methods, steps, guidance)
    rows = []
    for number, edit_ in enumerate(edits, 1):
        print(f"edit {number}/{len(edits)}: {edit_.kind}", flush=True)
        source01 = (edit_.source_tensor() + 1) / 2
        for method in methods:
            inv = inversions[(edit_.source_id, method)]
            for engine in engines:
                started = time.perf_counter()
                out = edit(model, inv.z_T, edit_.source_prompt, edit_.target_prompt, steps, engine=engine,
                           guidance=guidance, method=method, chain=inv.chain,
                           null_embeddings=inv.extras.get("null_embeddings"),
                           preset="spdinv" if engine == "p2p" else "", control=CallControl())
                edited = out.image.float().cpu()
                success, alignment = edit_bench.edit_success(evaluator, edited, edit_.target)
                rows.append({
                    "kind": edit_.kind, "source_id": edit_.source_id, "method": method, "engine": engine,
                    **edit_bench.background_metrics(edited, source01, edit_.edit_mask),
                    "structure": edit_bench.structure_distance(evaluator, edited, source01),
                    "success": float(success), "alignment": alignment,
                    "inversion_seconds": inv.seconds, "forward": inv.forward_evaluations,
                    "backward": inv.backward_evaluations, "edit_seconds": time.perf_counter() - started,
                })
    return rows


def summarise(rows: list[dict], key=("method", "engine")) -> dict[tuple, dict[str, float]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in key), []).append(row)
    numeric = ("psnr", "mse", "ssim", "structure", "success", "alignment", "inversion_seconds", "forward",
               "backward")
    return {k: {m: statistics.mean(r[m] for r in rs) for m in numeric} for k, rs in groups.items()}


def unique_inversion_seconds(rows: list[dict], method: str) -> float:
    """Mean inversion time per source (rows repeat it per edit and engine)."""
    per_source = {r["source_id"]: r["inversion_seconds"] for r in rows if r["method"] == method}
    return statistics.mean(per_source.values())


def write_report(rows: list[dict], args, out_dir: Path, wall_seconds: float) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    by_kind = summarise(rows, ("method", "engine", "kind"))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    kinds = [k for k in edit_bench.KINDS if any(r["kind"] == k for r in rows)]
    n_edits = len({(r["source_id"], r["kind"]) for r in rows})
    lines = [
        "# Inversion x editing on the toy world (the analogue of SPDInv's Table 1)",
        "",
        f"Generated by `make bench-inversion` (bench/bench_inversion_table.py): {n_edits} edits of "
        f"{len({r['source_id'] for r in rows})} source scenes (atelier.toyworld.edit_bench, seed {args.seed}), "
        f"{args.steps} DDIM steps, guidance {args.guidance} (the toy model's serving default; it over-saturates at SD's 7.5), "
        f"model `toy`, one CPU thread; {wall_seconds / 60:.1f} min wall on a shared 2-core machine. P2P runs "
        "the SPDInv script's preset (refine, blend on the changed words, their target attention x2) for every "
        "method; each method keeps its own pipeline (atelier.inversion.recipes: unconditional, ProxEdit, "
        "DirectInv's pinned source).",
        "",
        "Background metrics are outside the edit region (PSNR dB, MSE x10^3, SSIM x10^2); structure distance "
        "x10^3 (self-similarity of the world evaluator's 16x16 features, the stand-in for PIE-Bench's DINO); "
        "success = the evaluator reads every target attribute; alignment = its mean probability of them (the "
        "CLIP-score stand-in). Inversion seconds are per source image (wall, contended CPU: compare within "
        "the table only); UNet forward / forward+backward evaluations per inversion.",
        "",
        "| Inversion | Engine | Structure x10^3 (lower) | PSNR (higher) | MSE x10^3 (lower) | SSIM x10^2 (higher) "
        "| Success % | Alignment | Inversion s | UNet fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine in engines:
        for method in methods:
            s = summary[(method, engine)]
            lines.append(
                f"| {LABELS[method]} | {'P2P' if engine == 'p2p' else 'MasaCtrl'} | {s['structure'] * 1e3:.2f} | "
                f"{s['psnr']:.2f} | {s['mse'] * 1e3:.3f} | {s['ssim'] * 100:.2f} | {s['success'] * 100:.1f} | "
                f"{s['alignment']:.3f} | {unique_inversion_seconds(rows, method):.2f} | "
                f"{s['forward']:.0f} / {s['backward']:.0f} |")
    lines += ["", "Edit success (%) by edit kind:", "",
              "| Inversion | Engine | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for engine in engines:
        for method in methods:
            cells = " | ".join(f"{by_kind[(method, engine, k)]['success'] * 100:.0f}" for k in kinds)
            lines.append(f"| {LABELS[method]} | {'P2P' if engine == 'p2p' else 'MasaCtrl'} | {cells} |")
    lines += ["", "Background PSNR (dB) by edit kind:", "",
              "| Inversion | Engine | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for engine in engines:
        for method in methods:
            cells = " | ".join(f"{by_kind[(method, engine, k)]['psnr']:.1f}" for k in kinds)
            lines.append(f"| {LABELS[method]} | {'P2P' if engine == 'p2p' else 'MasaCtrl'} | {cells} |")
    lines += ["", "![background PSNR and edit success](inversion_psnr_success.png)", "",
              "![inversion time against background PSNR](inversion_cost.png)", ""]
    (out_dir / "inversion.md").write_text("\n".join(lines))
    (out_dir / "inversion.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    _plots(summary, rows, methods, engines, out_dir)


def _plots(summary, rows, methods, engines, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(engines)
    for j, engine in enumerate(engines):
        xs = [i + j * width for i in range(len(methods))]
        axes[0].bar(xs, [summary[(m, engine)]["psnr"] for m in methods], width, label=engine)
        axes[1].bar(xs, [summary[(m, engine)]["success"] * 100 for m in methods], width, label=engine)
    for ax, title in zip(axes, ("background PSNR (dB)", "edit success (%)")):
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(methods))])
        ax.set_xticklabels([LABELS[m].split(" ")[0] for m in methods], rotation=30)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "inversion_psnr_success.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for engine, marker in zip(engines, ("o", "s")):
        for method in methods:
            ax.scatter(unique_inversion_seconds(rows, method), summary[(method, engine)]["psnr"], marker=marker)
            ax.annotate(f"{LABELS[method].split(' ')[0]}/{engine}",
                        (unique_inversion_seconds(rows, method), summary[(method, engine)]["psnr"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("inversion seconds per image (log)")
    ax.set_ylabel("background PSNR (dB)")
    fig.tight_layout()
    fig.savefig(out_dir / "inversion_cost.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=None,
                        help="default: the model's serving default (atelier.json's default_guidance_scale)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--sources", type=int, default=8, help="one-object source scenes (3 edits each)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    parser.add_argument("--shard", default="", help="i/n: only the source scenes with id %% n == i; rows to a JSON")
    parser.add_argument("--merge", type=int, default=0, help="merge n shards' JSON into the report")
    args = parser.parse_args()
    registry = ModelRegistry()
    if args.guidance is None:
        args.guidance = registry.info("toy").default_guidance_scale
    out = Path(args.out)
    if args.merge:
        shards = [json.loads((out / f"inversion_shard{i}.json").read_text()) for i in range(args.merge)]
        rows = [row for shard in shards for row in shard["rows"]]
        write_report(rows, args, out, max(shard["wall"] for shard in shards))
        for i in range(args.merge):
            (out / f"inversion_shard{i}.json").unlink()
        print((out / "inversion.md").read_text())
        return
    torch.manual_seed(0)
    model = registry.load_sd("toy")
    evaluator = load_evaluator()
    edits = edit_bench.edit_set(one_object_sources=args.sources, seed=args.seed)
    if args.shard:
        index, count = (int(v) for v in args.shard.split("/"))
        edits = [e for e in edits if e.source_id % count == index]
    started = time.perf_counter()
    rows = run_table(model, evaluator, edits, steps=args.steps, guidance=args.guidance)
    wall = time.perf_counter() - started
    if args.shard:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"inversion_shard{index}.json").write_text(json.dumps({"rows": rows, "wall": wall}))
        return
    write_report(rows, args, out, wall)
    print((Path(args.out) / "inversion.md").read_text())


if __name__ == "__main__":
    main()
