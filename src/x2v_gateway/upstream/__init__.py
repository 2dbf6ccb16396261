"""The places jobs run, each behind the one door `base.Upstream`.

The rest of the gateway builds upstreams with these functions and then speaks only the
protocol: it never names an adapter class nor asks which one it holds.
"""

from __future__ import annotations

from .base import Capabilities, Upstream, UpstreamModel

__all__ = ["Capabilities", "Upstream", "UpstreamModel", "cloud_account", "self_hosted_node"]


def self_hosted_node(
    name: str, url: str, *, slots: int, timeout: float, form_threshold: int,
    tasks: frozenset[str] | None = None,
) -> Upstream:
    """One open-source LightX2V server; `tasks` None: every task type until it says otherwise."""
    from .selfhosted import SelfHostedNode

    node = SelfHostedNode(name, url, slots=slots, timeout=timeout, form_threshold=form_threshold)
    if tasks is not None:
        node.tasks = tasks
    return node


def cloud_account(
    name: str, base_url: str, token: str, *, models: dict[str, str], timeout: float
) -> Upstream:
    """One hosted-cloud account (access token); `models` overrides the default model per task."""
    from .cloud import DEFAULT_MODELS, CloudUpstream

    return CloudUpstream(name, base_url, token, models={**DEFAULT_MODELS, **models}, timeout=timeout)
