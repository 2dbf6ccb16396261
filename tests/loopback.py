"""HTTP to the servers the tests start on 127.0.0.1, with no TLS set up.

httpx's module-level `get`/`post` and a default `httpx.Client` load the CA bundle into a new SSL
context each time: 16 CPU-ms, where the request itself takes under 1. The readiness polls alone
(every 50-100 ms while a gateway or node starts, ~270 starts a run) made that a real share of the
suite's CPU on 2 cores. Everything the tests reach is plain HTTP on loopback, so these skip it.
"""

from __future__ import annotations

from typing import Any

import httpx


def client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(verify=False, **kwargs)


def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    with client() as http:
        return http.request(method, url, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return request("GET", url, **kwargs)


def post(url: str, **kwargs: Any) -> httpx.Response:
    return request("POST", url, **kwargs)


def delete(url: str, **kwargs: Any) -> httpx.Response:
    return request("DELETE", url, **kwargs)
