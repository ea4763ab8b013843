"""A model named by its Hugging Face repo id (`Qwen/Qwen3-0.6B`), as vLLM takes one, found in
the local Hugging Face cache where `hf download` (or transformers) put it. Nothing is
downloaded: a repo id that is not in the cache is refused with the command that fetches it.

The cache is the one huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. A repo's snapshot is
`models--<org>--<name>/snapshots/<commit>`, the commit named by `refs/main` (or by
`refs/<revision>` for `<org>/<name>@<revision>`; a commit hash names its snapshot directly).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class ModelNotFound(ValueError):
    """A model that is neither a directory nor a repo id in the local cache."""


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def is_repo_id(model: str) -> bool:
    """A repo id and not a path: `org/name` (optionally `@revision`) with no such file or directory."""
    return bool(_REPO_ID.match(model)) and not Path(model).exists()


def resolve(model: str, env: Mapping[str, str] | None = None) -> tuple[str, str | None]:
    """(the directory to load `model` from, its repo id when it named one). A path is returned
    as it is; a repo id becomes its snapshot in the cache, or ModelNotFound says how to fetch it."""
    if not model or not is_repo_id(model):
        return model, None
    repo_id, _, revision = model.partition("@")
    cache = cache_dir(env)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is not None and (snapshot / "config.json").is_file():
        return str(snapshot), repo_id
    where = f"revision {revision!r} of {repo_id}" if revision else repo_id
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    raise ModelNotFound(
        f"{model} is not a directory, and the Hugging Face cache ({cache}) holds no snapshot of {where} "
        f"with a config.json. Nothing is downloaded at run time: fetch it on a machine with internet with "
        f"`{fetch}` (then copy the cache over, or set HF_HOME to it), or pass the model's directory."
    )
