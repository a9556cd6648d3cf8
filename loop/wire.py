"""The samples' wire contract on NATS JetStream, beside the fleet's (fleet/protocol.py):

Stream EDGESTACK_SAMPLES, subjects edgestack.sample.<device_id> -> one spooled sample (loop.spool.Sample.encode():
a JSON header and the encoded image), header Nats-Msg-Id = the spool file's name, so a sample published again
after a lost acknowledgement is stored once (JetStream's duplicate window). File storage, limits on age and
bytes; the collector reads it through a durable pull consumer, so samples sent while it is down wait for it.

parse_sample() checks a message: a SampleError names the field; the image must hash to its sample_id.
"""
from __future__ import annotations

import hashlib
import math
import re
from typing import Any

import nats.js.errors
from nats.js import api

from fleet.protocol import check_token
from fleet.errors import ProtocolError
from loop.errors import SampleError, SpoolError
from loop.spool import Sample

STREAM_SAMPLES = "EDGESTACK_SAMPLES"
SAMPLE_SUBJECT_PREFIX = "edgestack.sample."
SAMPLE_SUBJECTS = SAMPLE_SUBJECT_PREFIX + ">"
SAMPLES_MAX_AGE_S = 14 * 24 * 3600.0
SAMPLES_MAX_BYTES = 4 * 1024 ** 3
SAMPLE_MAX_MSG_BYTES = 1024 * 1024  # nats-server's default max_payload
COLLECTOR_DURABLE = "edgestack-collector"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sample_subject(device_id: str) -> str:
    try:
        return SAMPLE_SUBJECT_PREFIX + check_token(device_id, "device_id")
    except ProtocolError as exc:
        raise SampleError(str(exc)) from None


async def ensure_samples_stream(js, *, max_age_s: float = SAMPLES_MAX_AGE_S,
                                max_bytes: int = SAMPLES_MAX_BYTES) -> None:
    """Create the samples stream when missing (idempotent; either side may be first)."""
    config = api.StreamConfig(name=STREAM_SAMPLES, subjects=[SAMPLE_SUBJECTS], storage=api.StorageType.FILE,
                              retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
                              max_age=max_age_s, max_bytes=max_bytes, max_msg_size=SAMPLE_MAX_MSG_BYTES,
                              duplicate_window=120.0)
    try:
        await js.stream_info(STREAM_SAMPLES)
    except nats.js.errors.NotFoundError:
        await js.add_stream(config)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise SampleError(message)


def parse_sample(subject: str, data: bytes) -> Sample:
    """One sample message -> Sample; SampleError naming the field when it is malformed or lies about its device
    (subject) or its image (sample_id is the image's sha256)."""
    try:
        sample = Sample.decode(data, f"sample on {subject}")
    except SpoolError as exc:
        raise SampleError(str(exc)) from None
    m: dict[str, Any] = sample.meta
    sid = m.get("sample_id")
    _need(isinstance(sid, str) and bool(_HEX64.match(sid)), f"sample.sample_id must be 64 hex digits, not {sid!r}")
    _need(hashlib.sha256(sample.image).hexdigest() == sid, "sample.sample_id is not the sha256 of its image")
    device = m.get("device_id")
    _need(isinstance(device, str) and subject == SAMPLE_SUBJECT_PREFIX + device,
          f"sample.device_id {device!r} is not the subject's ({subject})")
    for name in ("model_version", "time"):
        _need(isinstance(m.get(name), str) and bool(m.get(name)), f"sample.{name} must be a non-empty string")
    predictions = m.get("predictions")
    _need(isinstance(predictions, list), "sample.predictions must be a list")
    for i, p in enumerate(predictions):
        where = f"sample.predictions[{i}]"
        _need(isinstance(p, dict), f"{where} must be an object")
        box = p.get("box")
        _need(isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box), f"{where}.box must be 4 numbers")
        _need(_finite(p.get("score")) and 0.0 <= p["score"] <= 1.0, f"{where}.score must be a number in [0, 1]")
        _need(isinstance(p.get("class_id"), int) and not isinstance(p.get("class_id"), bool) and p["class_id"] >= 0,
              f"{where}.class_id must be an integer >= 0")
        _need(isinstance(p.get("class_name"), str), f"{where}.class_name must be a string")
    return sample


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
