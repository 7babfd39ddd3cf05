"""The Hugging Face hub for ``wanstream download``: being offline is a clear state, answered at once in one line.

huggingface_hub retries some calls with an exponential backoff (listing a repository: 5 retries, ~25 s when
the network is down) and its HTTP client has no timeout of its own. So before downloading, :func:`check_hub`
makes one request (no retry) with huggingface_hub's own metadata timeout, ``HF_HUB_ETAG_TIMEOUT`` (default 10 s),
and honours ``HF_HUB_OFFLINE=1`` without touching the network. Whatever goes wrong (no route, refused, timed out,
a proxy error, an HTTP error) becomes one :class:`RuntimeError` line saying what to do; the HTTP library's
exception types differ between huggingface_hub versions (requests, httpx), so any exception is turned into that
line.
"""

from __future__ import annotations


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no answer"
    return f"{type(exc).__name__}: {text[:200]}"


def hub_failure(exc: BaseException, what: str, by_hand: str) -> RuntimeError:
    """The one-line error for a failed hub request (``by_hand``: how to get the files without the hub)."""
    from huggingface_hub import constants
    return RuntimeError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to download {what} "
                        f"({_reason(exc)}). Check the network access (or HF_ENDPOINT, a proxy), or {by_hand}")


def check_hub(repo_id: str, what: str, by_hand: str) -> set[str]:
    """Fail at once when the hub cannot be used (``HF_HUB_OFFLINE`` set, or one request without retry gets no
    answer within ``HF_HUB_ETAG_TIMEOUT`` s); otherwise return the file names of the model repository."""
    from huggingface_hub import HfApi, constants
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"HF_HUB_OFFLINE is set, so {what} cannot be downloaded: unset it where the hub is "
                           f"reachable, or {by_hand}")
    try:
        info = HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - requests / httpx / hub errors alike: one line (see the module doc)
        raise hub_failure(exc, what, by_hand) from None
    return {s.rfilename for s in info.siblings or []}
