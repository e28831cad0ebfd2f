"""The ingest stage's pure parts: the naming rule, S3 event parsing, the polling lease
decision, webhook signatures and back-off, a job's room."""

from __future__ import annotations

import json
import time
from urllib.parse import quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3proxy.config import ConfigError, config_from_dict, load_config
from s3proxy.ingest.events import NotAnEvent, Upload, uploads_in
from s3proxy.ingest.notify import backoff_s, sign, verify
from s3proxy.ingest.rules import NameRule, RuleError
from s3proxy.ingest.service import event_id, job_room
from s3proxy.ingest.sources import LeaseRecord, may_take

SEGMENT = st.text(
    alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=30,
)
EXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=5)


@given(SEGMENT, EXT)
def test_the_default_rule_publishes_id_dot_ext_as_id_master(name: str, ext: str) -> None:
    rule = NameRule.compile("{id}.{ext}", "{id}/master.mp4")
    assert rule.asset_for(f"{name}.{ext}") == f"{name}/master.mp4"
    assert rule.asset_for(f"sub/{name}.{ext}") is None, "one segment: no '/' in {id}"
    assert rule.asset_for(name.replace(".", "")) is None, "no extension, no match"


@given(SEGMENT, SEGMENT, EXT)
def test_placeholders_in_several_segments(user: str, ident: str, ext: str) -> None:
    rule = NameRule.compile("{user}/{id}.{ext}", "{user}/{id}/master.{ext}")
    assert rule.asset_for(f"{user}/{ident}.{ext}") == f"{user}/{ident}/master.{ext}"


def test_the_last_extension_is_ext() -> None:
    rule = NameRule.compile("{id}.{ext}", "{id}.{ext}")
    assert rule.fields("my.film.mp4") == {"id": "my.film", "ext": "mp4"}


def test_a_hostile_key_is_matched_in_linear_time() -> None:
    rule = NameRule.compile("{a}/{b}.{ext}", "{a}/{b}.mp4")
    key = "x/" + "." * 1000 + "!"  # many candidate dots, no match
    started = time.perf_counter()
    for _ in range(100):
        assert rule.asset_for(key) is None
    assert time.perf_counter() - started < 1.0  # a backtracking pattern takes minutes


@pytest.mark.parametrize(
    ("match", "publish_as", "problem"),
    [
        ("{a}{b}.{ext}", "{a}", "more than one placeholder"),
        ("{id}-{ext}", "{id}", "{ext} may only end a segment"),
        ("{id}.{ext}", "{who}/x.mp4", "{who} is not in match"),
        ("{id}/{id}.{ext}", "{id}", "appears twice"),
        ("{i d}.{ext}", "x", "a placeholder is {name}"),
        ("", "x", "must not be empty"),
        ("{id}.{ext}", "/{id}", "must be an asset name template"),
    ],
)
def test_a_bad_rule_names_its_problem(match: str, publish_as: str, problem: str) -> None:
    with pytest.raises(RuleError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        NameRule.compile(match, publish_as)


def test_config_refuses_a_bad_rule_and_prefixes_inside_the_source() -> None:
    source = {"s3": {"bucket": "media"}, "ingest": {"source": "s3://uploads/raw/"}}
    with pytest.raises(ConfigError, match=r"ingest\.match"):
        load_config_from(source, match="{a}{b}")
    with pytest.raises(ConfigError, match=r"ingest\.lease_prefix"):
        load_config_from(source, lease_prefix="raw/leases/")
    with pytest.raises(ConfigError, match=r"ingest\.source"):
        config_from_dict({"ingest": {"source": "uploads/raw/"}})
    assert load_config_from(source).ingest.source == "s3://uploads/raw/"


def load_config_from(base: dict[str, dict[str, str]], **ingest: str) -> object:
    import tempfile
    from pathlib import Path

    data = {**base, "ingest": {**base["ingest"], **ingest}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(json.dumps(data))
        return load_config(path, env={})


def test_environment_overrides_reach_the_ingest_section() -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(json.dumps({"s3": {"bucket": "media"}}))
        config = load_config(
            path,
            env={
                "S3PROXY_INGEST_SOURCE": "s3://uploads/raw/",
                "S3PROXY_INGEST_MAX_CONCURRENT": "5",
                "S3PROXY_WEBHOOK_SECRET": "not an override: a secret by name",
            },
        )
    assert config.ingest.source == "s3://uploads/raw/" and config.ingest.max_concurrent == 5


def s3_event(bucket: str, key: str, size: int, etag: str, name: str = "ObjectCreated:Put") -> str:
    """The message S3 sends to a queue for one object (keys URL-encoded, '+' for ' ')."""
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventTime": "2026-12-02T02:42:41.666Z",
        "eventName": name,
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": quote_plus(key, safe="/"), "size": size, "eTag": etag},
        },
    }
    return json.dumps({"Records": [record]})


@given(st.text(min_size=1, max_size=60), st.integers(0, 1 << 40))
def test_an_event_names_its_object_exactly(key: str, size: int) -> None:
    (upload,) = uploads_in(s3_event("uploads", key, size, "abc"))
    assert upload == Upload("uploads", key, size, "abc", 1796179361.666)


def test_events_that_create_nothing_and_envelopes() -> None:
    assert uploads_in(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []
    assert uploads_in(s3_event("b", "k", 1, "e", "ObjectRemoved:Delete")) == []
    inner = s3_event("b", "raw/a b.mp4", 3, "e")
    (upload,) = uploads_in(json.dumps({"Type": "Notification", "Message": inner}))  # via SNS
    assert upload.key == "raw/a b.mp4"
    for body in ("not json", "[]", json.dumps({"Type": "Notification", "Message": "x"})):
        with pytest.raises(NotAnEvent):
            uploads_in(body)


NOW = 1_000_000.0


@given(
    st.sampled_from(["running", "done"]),
    st.sampled_from(["e1", "e2"]),
    st.floats(NOW - 100, NOW + 100),
)
def test_a_poller_takes_an_upload_only_when_no_one_holds_or_settled_it(
    state: str, etag: str, expires: float
) -> None:
    record = LeaseRecord("other", state, etag, expires)
    allowed = may_take(record, "e1", NOW)
    if state == "done":
        assert allowed == (etag != "e1")  # settled for this very upload: never again
    else:
        assert allowed == (expires <= NOW)  # another's lease runs until it expires
    assert may_take(None, "e1", NOW)


def test_a_lease_record_round_trips_and_a_damaged_one_reads_as_none() -> None:
    record = LeaseRecord("host:1", "running", "e", 12.5)
    assert LeaseRecord.parse(record.body()) == record
    assert LeaseRecord.parse(b"{") is None and LeaseRecord.parse(b'{"owner": 1}') is None


@given(st.binary(max_size=200), st.text(min_size=16, max_size=40))
def test_a_signature_holds_for_its_body_only(body: bytes, secret: str) -> None:
    header = sign(body, secret)
    assert header.startswith("sha256=") and verify(body, header, secret)
    assert not verify(body + b" ", header, secret)
    assert not verify(body, header, secret + "x")


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n, 1.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_an_event_id_is_stable_per_outcome_and_version() -> None:
    upload = Upload("b", "raw/a.mp4", 1, "e1")
    assert event_id("asset.ready", upload) == event_id("asset.ready", upload)
    assert event_id("asset.ready", upload) != event_id("asset.failed", upload)
    other = Upload("b", "raw/a.mp4", 1, "e2")
    assert event_id("asset.ready", upload) != event_id("asset.ready", other)


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 30))
def test_a_job_needs_room_for_the_upload_twice_and_the_margin(size: int, margin: int) -> None:
    assert job_room(size, margin) >= 2 * size + margin
