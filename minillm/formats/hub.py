"""Find a model directory: a local path, or a Hugging Face Hub repo id fetched into the hub cache.

`resolve_model_dir("dir/or/owner-name")` is the one entry point. A local directory is used as
is. Anything that looks like a path but is not a directory is an error (we never send a typo'd
path to the network). Everything else must be a repo id (`name` or `owner/name`); it is fetched
with `huggingface_hub.snapshot_download` into the usual hub cache (`HF_HOME`, `HF_HUB_CACHE`),
downloading only the files minillm reads (config, safetensors weights, tokenizer files), never
`.bin` pickles. Offline (`HF_HUB_OFFLINE=1`) a cached snapshot is still found.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from minillm.errors import MiniLLMError, first_line

# The only files minillm reads from a repo. Anything else (pytorch_model.bin, onnx, flax, ...) is
# left on the hub; a repo with only .bin weights can be converted with tools/convert_bin.py.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

# `name` or `owner/name`: alphanumerics, '-', '_', '.'; no '--' or '..'; at most 96 characters
# (the hub's own rules, checked here so a bad id fails before any network traffic).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")


def _looks_local(s: str) -> bool:
    """True if `s` is meant as a filesystem path rather than a hub repo id."""
    if s.startswith((".", "/", "~")) or os.path.exists(s):
        return True
    # "weights/llama-tiny" when ./weights exists: a mistyped local path, not an owner on the hub.
    parent = os.path.dirname(s)
    if parent and os.path.isdir(parent):
        return True
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    # A repo id has at most one '/'; 'a/b/c' or any backslash on Windows is a path.
    return sum(s.count(c) for c in seps) > 1 or (os.sep != "/" and os.sep in s)


def _check_repo_id(repo_id: str) -> None:
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        raise MiniLLMError(
            f"not a local directory or a hub repo id ('name' or 'owner/name'): {repo_id!r}"
        )


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """Return a local directory holding the model files named by `name_or_path`.

    A local directory is returned as is (`~` expanded). A hub repo id is downloaded (or found in
    the cache) and its snapshot directory returned. Raises MiniLLMError, with a one-line message,
    for a missing local path, a malformed repo id, or a repo that cannot be fetched.
    """
    s = os.fspath(name_or_path)
    if not isinstance(s, str):  # os.fspath(bytes-like) gives bytes
        raise MiniLLMError(f"model path must be a str or os.PathLike of str, got {s!r}")
    path = Path(s).expanduser()
    if path.is_dir():
        return path
    if isinstance(name_or_path, os.PathLike) or _looks_local(s):
        if path.exists():
            import stat

            from .reading import kind_of

            mode = path.stat().st_mode
            what = "is a file, not a directory" if stat.S_ISREG(mode) else f"is {kind_of(mode)}, not a directory"
        else:
            what = "not found"
        raise MiniLLMError(f"model directory {what}: {s}")
    _check_repo_id(s)
    return _download(s)


def _download(repo_id: str) -> Path:
    """snapshot_download with every hub failure turned into one clear MiniLLMError."""
    # Lazy import: the hub client (and its HTTP stack) is only needed for repo ids, and it reads
    # HF_HUB_OFFLINE / HF_HOME at import time.
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    network_errors: tuple[type[BaseException], ...] = (OSError, HfHubHTTPError)
    try:  # the hub client's HTTP library; its connection errors are not OSErrors
        import httpx

        network_errors += (httpx.HTTPError,)
    except ImportError:  # pragma: no cover - older hub clients use requests (raises OSError)
        pass

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        snapshot = huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except HFValidationError as e:
        raise MiniLLMError(f"not a valid hub repo id: {repo_id!r} ({first_line(e)})") from None
    except GatedRepoError:
        raise MiniLLMError(
            f"hub repo {repo_id} is gated: accept its license on the hub and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise MiniLLMError(
            f"hub repo {repo_id} not found (or private: log in with `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise MiniLLMError(f"hub repo {repo_id} has no 'main' revision") from None
    except LocalEntryNotFoundError:
        raise MiniLLMError(_not_cached(repo_id, offline, constants.HF_HUB_CACHE)) from None
    except network_errors as e:
        # Anything else from the network or the cache: name the repo and the cause, one line.
        raise MiniLLMError(
            f"cannot fetch hub repo {repo_id} into {constants.HF_HUB_CACHE}"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ''}: {type(e).__name__}: {first_line(e)}"
        ) from None
    return Path(snapshot)


def _not_cached(repo_id: str, offline: bool, cache: str) -> str:
    why = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
    return (
        f"{repo_id} is not a local directory, and as a hub repo it is not in the local cache "
        f"({cache}) and the hub cannot be reached{why}"
    )

