"""Fill a models folder (the cluster's models volume) with model snapshots.

    python -m atelier.models pull --to /models \\
        sd15=stable-diffusion-v1-5/stable-diffusion-v1-5 sam=facebook/sam-vit-base
    python -m atelier.models pull --to /models --from /mnt/offline sd15=stable-diffusion-v1-5/stable-diffusion-v1-5

Each ``NAME=SOURCE`` ends up as ``<to>/<last part of SOURCE>`` (``/models/stable-diffusion-v1-5``)
and the command prints the ATELIER_MODELS value naming them (the k8s ConfigMap's). SOURCE is a
hub repository id. Without ``--from`` it is downloaded (huggingface_hub, where the network
allows; weights as safetensors only unless ``--ignore`` says otherwise). With ``--from DIR``
(air-gapped clusters) nothing is downloaded: DIR holds either the plain folder
(``DIR/stable-diffusion-v1-5``, e.g. copied from a machine with network) or a Hugging Face
hub cache (``DIR/models--org--name/snapshots/<revision>``, e.g. a copied ~/.cache/huggingface/hub).

Copies are atomic per model: written to ``<to>/.<folder>.partial`` and renamed when complete,
so a service never sees half a model; symlinks (hub caches) are copied as the files they point
to. An existing folder is kept unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "pull_one", "find_local_snapshot", "DEFAULT_IGNORE"]

# Hub repositories often carry the same weights several times over (PyTorch pickles, Flax,
# TF, ONNX, single-file checkpoints); the services load diffusers/transformers safetensors.
DEFAULT_IGNORE = ("*.ckpt", "*.bin", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "*.pt")


class PullError(RuntimeError):
    pass


def _folder_name(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if not name or name in (".", ".."):
        raise PullError(f"cannot name a folder after {source!r}")
    return name


def _looks_like_a_model(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def find_local_snapshot(root: Path, source: str, revision: Optional[str] = None) -> Path:
    """The folder under ``root`` holding ``source``: a plain copy or a hub-cache snapshot."""
    candidates = [root / _folder_name(source), root / source]
    cache = root / ("models--" + source.replace("/", "--"))
    if cache.is_dir():
        snapshots = cache / "snapshots"
        wanted = revision
        if wanted is None and (cache / "refs" / "main").is_file():
            wanted = (cache / "refs" / "main").read_text().strip()
        if wanted is not None:
            if (cache / "refs" / wanted).is_file():
                wanted = (cache / "refs" / wanted).read_text().strip()
            candidates.insert(0, snapshots / wanted)
        elif snapshots.is_dir():
            candidates[:0] = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        if candidate.is_dir() and _looks_like_a_model(candidate):
            return candidate
    raise PullError(f"{source!r} is not under {root} (looked for {', '.join(str(c) for c in candidates)})")


def _copy_tree(source: Path, target: Path) -> None:
    # symlinks=False: hub caches link snapshot files to blobs; the volume gets real files.
    shutil.copytree(source, target, symlinks=False, ignore=shutil.ignore_patterns(".git", ".cache", "*.lock"))


def pull_one(source: str, to: Path, from_dir: Optional[Path] = None, revision: Optional[str] = None,
             ignore: Sequence[str] = DEFAULT_IGNORE, force: bool = False) -> Path:
    """Place ``source`` at ``to/<folder>``; returns that folder."""
    target = to / _folder_name(source)
    if target.exists() and not force:
        if not _looks_like_a_model(target):
            raise PullError(f"{target} exists but holds no model_index.json/config.json; use --force")
        print(f"[models] {target} already there; kept (--force replaces it)", flush=True)
        return target
    to.mkdir(parents=True, exist_ok=True)
    partial = to / f".{target.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    if from_dir is not None:
        snapshot = find_local_snapshot(from_dir, source, revision)
        print(f"[models] copying {snapshot} -> {target}", flush=True)
        _copy_tree(snapshot, partial)
    else:
        from huggingface_hub import snapshot_download

        print(f"[models] downloading {source}{'@' + revision if revision else ''} -> {target}", flush=True)
        snapshot_download(source, revision=revision, local_dir=partial, ignore_patterns=list(ignore) or None)
        shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's download metadata
    if not _looks_like_a_model(partial):
        shutil.rmtree(partial)
        raise PullError(f"{source}: no model_index.json or config.json in what was fetched")
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atelier.models",
                                     description="Put model folders where the services read them.")
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="copy model snapshots into a folder (the models volume)",
                               description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    pull.add_argument("models", nargs="+", metavar="NAME=SOURCE", help="registry name = hub repository id")
    pull.add_argument("--to", required=True, type=Path, help="the models folder, e.g. /models")
    pull.add_argument("--from", dest="from_dir", type=Path,
                      help="air-gapped: take the snapshots from this folder (plain folders or a hub cache)")
    pull.add_argument("--revision", help="hub revision (branch, tag or commit) for every model")
    pull.add_argument("--ignore", action="append", metavar="GLOB",
                      help=f"files not to download, repeatable (default: {' '.join(DEFAULT_IGNORE)})")
    pull.add_argument("--force", action="store_true", help="replace folders that already exist")
    export = commands.add_parser("export-sam-onnx", help="SAM's image encoder as an ONNX Triton model",
                                 description="Export SAM's image encoder to ONNX in a Triton model repository "
                                             "(see atelier/models/onnx_export.py).")
    export.add_argument("--sam", required=True, help="a transformers SamModel folder, e.g. /models/sam-vit-base")
    export.add_argument("--repository", required=True, help="Triton model repository to write into")
    export.add_argument("--instance-kind", default="KIND_GPU", choices=("KIND_GPU", "KIND_CPU"))
    export.add_argument("--check", dest="check", action="store_true", default=None,
                        help="compare with the torch encoder (default: when onnxruntime is installed)")
    export.add_argument("--no-check", dest="check", action="store_false")
    export.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.command == "export-sam-onnx":
        from atelier.models.onnx_export import ExportError, main_export

        try:
            return main_export(args.sam, args.repository, args.check, args.tolerance, args.instance_kind)
        except (ExportError, OSError) as error:
            print(f"[models] {error}", file=sys.stderr)
            return 1

    entries = []
    for item in args.models:
        name, sep, source = item.partition("=")
        if not sep or not name.strip() or not source.strip():
            parser.error(f"expected NAME=SOURCE, got {item!r}")
        entries.append((name.strip(), source.strip()))
    if args.from_dir is not None and not args.from_dir.is_dir():
        parser.error(f"--from {args.from_dir}: not a folder")
    registry = []
    try:
        for name, source in entries:
            folder = pull_one(source, args.to, args.from_dir, args.revision,
                              DEFAULT_IGNORE if args.ignore is None else args.ignore, args.force)
            registry.append(f"{name}={folder}")
    except PullError as error:
        print(f"[models] {error}", file=sys.stderr)
        return 1
    print(f"ATELIER_MODELS={';'.join(registry)}")
    return 0
