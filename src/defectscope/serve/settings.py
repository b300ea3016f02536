"""The server's limits and behaviour, with the defaults the command line shows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """What one app enforces.

    max_batch: most images in one forward pass (1 turns batching off).
    max_wait_ms: how long the first request of a batch waits for company.
    max_queue: most requests waiting for a batch, per model; more are answered 503.
    timeout_s: per-request limit, from arrival to answer (504 after it).
    max_body_bytes: largest request body (413).
    max_pixels: largest decoded image, width x height, read from the header before decoding (413).
    api_key: when set, every route but ``/healthz``, ``/readyz`` and the page needs
        ``Authorization: Bearer <api_key>``.
    handle_sighup: reload every model on SIGHUP (only where the loop runs in the main thread).
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    api_key: str | None = None
    handle_sighup: bool = False
