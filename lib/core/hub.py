"""The Hugging Face Hub seen from a script: is it reachable, and what a failed download means in one sentence."""

from __future__ import annotations

import os
import socket

from huggingface_hub import is_offline_mode
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lib.core.errors import UserError

_reachable: bool | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether huggingface.co answers from this machine (False in offline mode); asked once per process."""
    global _reachable
    if is_offline_mode():
        return False
    if _reachable is None:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
        host, _, port = endpoint.partition(":")
        try:
            socket.create_connection((host, int(port or 443)), timeout=timeout).close()
            _reachable = True
        except OSError:
            _reachable = False
    return _reachable


def looks_like_a_path(name: str) -> bool:
    """A name the user meant as a local folder (hub ids are ``name`` or ``org/name``)."""
    return name.startswith((".", "/", "~", os.sep)) or name.count("/") > 1


def _caused_by(err: BaseException, kinds) -> bool:
    """Whether ``err`` or anything it was raised from is one of ``kinds`` (transformers wraps hub errors in OSError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kinds):
            return True
        err = err.__cause__ or err.__context__
    return False


def hub_error_sentence(what: str, name: str, err: BaseException, flag: str) -> UserError:
    """One sentence for a failed ``from_pretrained`` / download of ``name`` (``what``: "model", "dataset", ...)."""
    if os.path.isdir(name):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return UserError(f"{flag} {name} is a folder but not a {what} that can be loaded ({first}).")
    if looks_like_a_path(name):
        return UserError(f"{flag} {name} does not exist; check the path.")
    if _caused_by(err, GatedRepoError):
        return UserError(f"{flag} {name} is a gated repository on the hub: accept its terms on its page and log in "
                         "(`hf auth login`), or pass a local copy.")
    if _caused_by(err, RevisionNotFoundError):
        return UserError(f"{flag} {name}: the requested revision does not exist on the hub; check the revision.")
    if _caused_by(err, RepositoryNotFoundError):
        return UserError(f"{flag} {name} was not found on the hub (or it is private: log in with `hf auth login`); "
                         "check the id, or pass a local path or a builtin model.")
    if _caused_by(err, (OfflineModeIsEnabled, LocalEntryNotFoundError)) or not hub_reachable():
        return UserError(f"{flag} {name} is not a local folder and the model hub is unreachable from this machine "
                         "(offline), so it cannot be downloaded; pass a local path or a builtin model.")
    if _caused_by(err, HfHubHTTPError):
        return UserError(f"{flag} {name}: the hub refused the download ({str(err).splitlines()[0]}).")
    return UserError(f"{flag} {name} could not be loaded as a {what} ({type(err).__name__}: "
                     f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}).")


def check_push_to_hub(push_to_hub: bool, hub_model_id: str | None) -> None:
    """Refuse ``--push_to_hub`` before any training when the upload could not happen."""
    if not push_to_hub:
        return
    if not hub_reachable():
        raise UserError("--push_to_hub needs the model hub, which is unreachable from this machine (offline); drop "
                        "the flag and upload the output folder later with `hf upload`.")
