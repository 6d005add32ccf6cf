"""Classify an action as ``compute`` (runs well locally) or ``api`` (talks to outside APIs).

Exact names from the PRD's LOCAL_PREFERRED and CLOUD_PREFERRED sets win; then whole families
(``linkedin.*``); an action in neither is ``compute`` — cheap, private, and never a surprise bill.
"""

from __future__ import annotations

from enum import StrEnum


class ActionKind(StrEnum):
    COMPUTE = "compute"
    API = "api"


LOCAL_PREFERRED = frozenset(
    {
        "content.analyze_video",
        "content.youtube_payload",
        "feedback.checkbacks",
        "feedback.analysis",
        "feedback.twitter_cycle",
        "feedback.universal_cycle",
        "twitter.metrics",
        "twitter.playbook",
        "blotato.queue_summary",
        "blotato.queue_audit",
        "system.self_test",
        "system.heartbeat",
    }
)
CLOUD_PREFERRED = frozenset(
    {
        "research.platform",
        "research.keyword",
        "research.twitter",
        "dm.send",
        "dm.conversations",
        "dm.process_outreach",
        "linkedin.search",
        "linkedin.prospect",
        "linkedin.message",
        "linkedin.campaign",
        "upwork.search",
        "upwork.propose",
        "upwork.scan",
        "publish.auto",
        "publish.multi",
        "publish.lite",
        "safari.health",
        "safari.ensure_session",
        "telegram.send",
        "comments.post",
        "comments.threads_engage",
    }
)
# Families: content generation, evaluation and embedding are compute; research, messaging,
# publishing, the hosted model APIs and the marketplaces are api (docs/routing.md).
COMPUTE_FAMILIES = frozenset(
    {"content", "feedback", "embedding", "evaluation", "eval", "system", "blotato", "twitter"}
)
API_FAMILIES = frozenset(
    {
        "research",
        "dm",
        "linkedin",
        "upwork",
        "publish",
        "safari",
        "telegram",
        "comments",
        "claude",
        "openai",
        "revenue",
        "crm",
    }
)


class ActionClassifier:
    """``classify(action) -> ActionKind`` with a memo (routing calls it on every request)."""

    def __init__(
        self,
        *,
        local_preferred: frozenset[str] = LOCAL_PREFERRED,
        cloud_preferred: frozenset[str] = CLOUD_PREFERRED,
        compute_families: frozenset[str] = COMPUTE_FAMILIES,
        api_families: frozenset[str] = API_FAMILIES,
        default: ActionKind = ActionKind.COMPUTE,
    ) -> None:
        self._local = local_preferred
        self._cloud = cloud_preferred
        self._compute_families = compute_families
        self._api_families = api_families
        self._default = default
        self._memo: dict[str, ActionKind] = {}

    def classify(self, action: str) -> ActionKind:
        kind = self._memo.get(action)
        if kind is None:
            kind = self._classify(action)
            if len(self._memo) < 10_000:
                self._memo[action] = kind
        return kind

    def _classify(self, action: str) -> ActionKind:
        if action in self._local:
            return ActionKind.COMPUTE
        if action in self._cloud:
            return ActionKind.API
        family = action.partition(".")[0]
        if family in self._api_families:
            return ActionKind.API
        if family in self._compute_families:
            return ActionKind.COMPUTE
        return self._default


def classify(action: str) -> ActionKind:
    """Classify with the default sets (the PRD's module-level function)."""
    return _DEFAULT.classify(action)


_DEFAULT = ActionClassifier()
