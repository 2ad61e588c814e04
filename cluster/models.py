"""``model.path`` as a local folder or a Hugging Face hub id: resolved once, checked before anything starts.

* ``builtin:qwen2-tiny``: built by troupe in the run folder (``cluster/prepare.py``).
* An existing local folder: used as is.
* Anything else is a hub id (``Qwen/Qwen2.5-1.5B-Instruct``, optionally ``@revision``): the driver
  downloads it once with ``huggingface_hub.snapshot_download`` into the HF cache (``HF_HOME`` /
  ``HF_HUB_CACHE``; on a cluster, put it on storage every node mounts) and hands the engines and
  learner ranks the snapshot folder, so actors never download concurrently. ``HF_HUB_OFFLINE=1``
  resolves from the cache only (what machines without network do).

``troupe check`` calls :func:`check_model`: the model's config and tokenizer must load (as
transformers will load them in the actors), else exit 2 with the reason. This catches a
``model.path`` that does not exist where the check runs before any actor starts.
"""

from __future__ import annotations

from pathlib import Path


class ModelPathError(ValueError):
    """``model.path`` is neither a loadable local folder nor a hub id that resolves (message says why)."""


def _split_revision(path: str) -> tuple[str, str | None]:
    repo, _, rev = path.partition("@")
    return repo, rev or None


def resolve_model(path: str) -> str:
    """A local folder for ``path`` (``builtin:`` names are returned unchanged for the caller to build).

    Args:
        path: ``model.path``.
    Returns:
        ``path`` itself for a local folder or a builtin name; else the hub snapshot's folder.
    Raises:
        ModelPathError: ``path`` looks like a local path (starts with ``/``, ``.`` or ``~``) that does
            not exist, or the hub cannot provide it (offline and not cached, unknown repo, no network).
    """
    if path.startswith("builtin:"):
        return path
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    if path.startswith(("/", ".", "~")) or _split_revision(path)[0].count("/") > 1:
        raise ModelPathError(f"model.path {path!r}: no such folder here (and not a hub id 'org/name')")
    from huggingface_hub import snapshot_download

    repo, rev = _split_revision(path)
    try:
        return snapshot_download(repo_id=repo, revision=rev,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except Exception as e:  # noqa: BLE001 - hub/offline/cache errors all mean: this id cannot be used here
        raise ModelPathError(f"model.path {path!r}: not a local folder, and the Hugging Face hub cannot provide it "
                             f"({type(e).__name__}: {e}). Offline machines need it in the HF cache "
                             "(HF_HOME), or a local folder") from e


def check_model(path: str) -> str:
    """Resolve ``path`` and load its config and tokenizer with transformers; returns a one-line description.

    Raises:
        ModelPathError: as :func:`resolve_model`, or transformers cannot load the config or tokenizer.
    """
    if path.startswith("builtin:"):
        return f"{path} (built at start)"
    local = resolve_model(path)
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(local)
    except Exception as e:  # noqa: BLE001
        raise ModelPathError(f"model.path {path!r}: its config does not load ({e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(local)
    except Exception as e:  # noqa: BLE001
        raise ModelPathError(f"model.path {path!r}: its tokenizer does not load ({e})") from e
    where = "" if local == path else f" from {local}"
    return f"{path}: {config.model_type}, vocab {len(tok)}{where}"
