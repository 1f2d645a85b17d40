"""Publishing an export folder to the Hugging Face Hub, behind an explicit flag, with a dry run that needs no network.

    embedscale export model.name_or_path=runs/train/<ts>/model hub.repo_id=me/scifact-minilm hub.dry_run_dir=/tmp/up
    embedscale export model.name_or_path=runs/train/<ts>/model hub.repo_id=me/scifact-minilm hub.push=true

The folder published is the model's export directory as it is on disk (the sentence-transformers/HF files, the
model card, embedscale.json and, after `embedscale export`, onnx/), minus temporary names. The dry run copies
exactly those files to <dry_run_dir>/<name>/ and writes upload_plan.json (repository, visibility, files, bytes):
what `hub.push=true` would send, checkable without a token or network. The upload itself is
`huggingface_hub.HfApi.upload_folder` with the same file list.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from embedscale.config import HubConfig
from embedscale.encoder.biencoder import EXPORT_META

log = logging.getLogger(__name__)

PLAN = "upload_plan.json"


def publish_files(folder: Path) -> list[str]:
    """The files of `folder` that are published, relative and sorted (temporary and hidden names left out)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(p.startswith(".") or ".tmp-" in p or ".old-" in p for p in rel.parts):
            files.append(rel.as_posix())
    return files


def check_publishable(folder: Path, cfg: HubConfig) -> None:
    """Refuse, before any work, a folder that is not an embedscale export."""
    if not (Path(folder) / EXPORT_META).is_file():
        raise ValueError(
            f"hub.repo_id={cfg.repo_id}: {folder} is not an embedscale export (no {EXPORT_META}); publish a training "
            "run's model/ directory (model.name_or_path=runs/train/<ts>/model)"
        )
    target = dry_run_target(cfg)
    if target is not None and target.exists() and any(target.iterdir()):
        raise ValueError(f"hub.dry_run_dir: {target} exists and is not empty; choose another hub.dry_run_dir")


def dry_run_target(cfg: HubConfig) -> Path | None:
    return Path(cfg.dry_run_dir) / cfg.repo_id.split("/")[1] if cfg.dry_run_dir and cfg.repo_id else None


def publish(folder: str | Path, cfg: HubConfig) -> dict | None:
    """Upload `folder` to cfg.repo_id (hub.push=true), or write the dry run (hub.dry_run_dir); returns the plan."""
    if cfg.repo_id is None:
        return None
    folder = Path(folder)
    check_publishable(folder, cfg)
    files = publish_files(folder)
    plan = {
        "repo_id": cfg.repo_id,
        "private": cfg.private,
        "folder": str(folder),
        "files": files,
        "bytes": sum((folder / f).stat().st_size for f in files),
        "commit_message": f"embedscale export of {folder.name}",
    }
    if cfg.dry_run_dir:
        target = dry_run_target(cfg)
        for rel in files:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, target / rel)
        (target / PLAN).write_text(json.dumps(plan, indent=2) + "\n")
        log.info(
            "hub dry run: %d files (%d bytes) for %s in %s; nothing uploaded",
            len(files),
            plan["bytes"],
            cfg.repo_id,
            target,
        )
        return {**plan, "dry_run": str(target)}
    if not cfg.push:
        log.info(
            "hub.repo_id=%s without hub.push=true: nothing uploaded (hub.dry_run_dir shows what would be)", cfg.repo_id
        )
        return {**plan, "uploaded": False}
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ValueError("hub.push=true while HF_HUB_OFFLINE is set: unset it to upload, or use hub.dry_run_dir")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
    api.upload_folder(
        repo_id=cfg.repo_id, folder_path=str(folder), allow_patterns=files, commit_message=plan["commit_message"]
    )
    log.info("uploaded %d files to https://huggingface.co/%s", len(files), cfg.repo_id)
    return {**plan, "uploaded": True}
