"""ActionClassifier: the PRD's preferred sets, whole families, and the compute default."""

from __future__ import annotations

import pytest

from action_classifier import (
    CLOUD_PREFERRED,
    LOCAL_PREFERRED,
    ActionClassifier,
    ActionKind,
    classify,
)

pytestmark = pytest.mark.prd200

# The PRD's sets, restated so a change to either side shows up here.
PRD_LOCAL = {
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
PRD_CLOUD = {
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


def test_the_sets_are_the_prds() -> None:
    assert LOCAL_PREFERRED == PRD_LOCAL
    assert CLOUD_PREFERRED == PRD_CLOUD
    assert not LOCAL_PREFERRED & CLOUD_PREFERRED


@pytest.mark.parametrize("action", sorted(PRD_LOCAL))
def test_local_preferred_is_compute(action: str) -> None:
    assert classify(action) is ActionKind.COMPUTE


@pytest.mark.parametrize("action", sorted(PRD_CLOUD))
def test_cloud_preferred_is_api(action: str) -> None:
    assert classify(action) is ActionKind.API


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        # Content generation, evaluation and embedding are compute ...
        ("content.anything", ActionKind.COMPUTE),
        ("content.generate", ActionKind.COMPUTE),
        ("content.embed", ActionKind.COMPUTE),
        ("embedding.batch", ActionKind.COMPUTE),
        ("evaluation.score", ActionKind.COMPUTE),
        ("eval.rubric", ActionKind.COMPUTE),
        ("feedback.new_cycle", ActionKind.COMPUTE),
        ("twitter.new_metric", ActionKind.COMPUTE),
        ("blotato.anything", ActionKind.COMPUTE),
        ("system.echo", ActionKind.COMPUTE),
        # ... research, dm, publish, linkedin, upwork (and the hosted APIs) are api.
        ("linkedin.anything", ActionKind.API),
        ("research.new_source", ActionKind.API),
        ("dm.archive", ActionKind.API),
        ("publish.tiktok", ActionKind.API),
        ("upwork.withdraw", ActionKind.API),
        ("safari.screenshot", ActionKind.API),
        ("telegram.poll", ActionKind.API),
        ("comments.delete", ActionKind.API),
        ("claude.complete", ActionKind.API),
        ("openai.embed", ActionKind.API),
        ("revenue.dashboard", ActionKind.API),
        ("crm.sync", ActionKind.API),
        # Neither a listed action nor a known family: compute.
        ("weather.today", ActionKind.COMPUTE),
        ("x", ActionKind.COMPUTE),
        ("", ActionKind.COMPUTE),
        ("linkedinx.search", ActionKind.COMPUTE),
    ],
)
def test_classify(action: str, kind: ActionKind) -> None:
    assert classify(action) is kind
    assert ActionClassifier().classify(action) is kind


def test_kinds_compare_equal_to_the_prds_strings() -> None:
    assert classify("dm.send") == "api"
    assert classify("content.analyze_video") == "compute"


def test_an_exact_set_entry_beats_its_family() -> None:
    classifier = ActionClassifier(
        local_preferred=frozenset({"research.local_index"}),
        cloud_preferred=frozenset({"content.cloud_render"}),
    )
    assert classifier.classify("research.local_index") is ActionKind.COMPUTE
    assert classifier.classify("research.other") is ActionKind.API
    assert classifier.classify("content.cloud_render") is ActionKind.API
    assert classifier.classify("content.other") is ActionKind.COMPUTE


def test_the_default_is_configurable() -> None:
    classifier = ActionClassifier(default=ActionKind.API)
    assert classifier.classify("weather.today") is ActionKind.API
    assert classifier.classify("content.generate") is ActionKind.COMPUTE


def test_the_memo_stays_bounded() -> None:
    classifier = ActionClassifier()
    for n in range(10_050):
        assert classifier.classify(f"svc{n}.topic") is ActionKind.COMPUTE
    assert len(classifier._memo) == 10_000
    assert classifier.classify("dm.send") is ActionKind.API
