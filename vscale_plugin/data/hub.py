"""Whether the Hugging Face hub can be reached, asked once and quickly.

Offline without ``HF_HUB_OFFLINE``, every hub download (a tokenizer, a model's config, C4) retries for about 50 s
before it fails or falls back to the local cache. Asking first lets a run load what is cached at once
(``local_files_only``) and report what is missing at once, naming what to pass instead.
"""

from __future__ import annotations

import functools
from pathlib import Path

# A hub that does not answer within this is treated as unreachable: long enough for a slow link, short next to the
# ~50 s of retries it replaces.
_PROBE_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now (offline mode, or no answer), or None when it answers."""
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return _probe(huggingface_hub.constants.ENDPOINT)


def offline_for(name: str) -> str | None:
    """Why ``name`` (a model or tokenizer) must come from the local Hugging Face cache alone (pass
    ``local_files_only=offline_for(name) is not None``): None for a local path, which downloads nothing, or when the
    hub answers; else why the hub cannot be used."""
    return None if Path(name).expanduser().exists() else hub_unreachable()


@functools.cache
def _probe(endpoint: str) -> str | None:
    from huggingface_hub.utils import get_session

    try:
        # The hub's own HTTP session, so proxies and certificates configured for it apply to the probe as well.
        get_session().head(endpoint, timeout=_PROBE_TIMEOUT_S)
    except Exception as err:  # the session's transport errors (httpx or requests, by huggingface_hub version)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"{endpoint} does not answer: {first}"
    return None
