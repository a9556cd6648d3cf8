"""fleet.protocol.FleetBus on NATS JetStream (nats-py): key-value buckets for desired state, registrations and
rollouts, a stream of device reports read through a durable pull consumer.

    bus = await NatsFleetBus.connect("nats://127.0.0.1:4222", name="controller")   # creates buckets + stream
    await bus.put_desired_many({device_id: desired, ...})     # pipelined: publish all, await the acks together
    async for device_id, desired in bus.watch_desired(None):  # one wildcard watch for every device
        ...
    reports = await bus.fetch_reports()                       # Report or InvalidReport per message, acked
    await bus.close()

Connections reconnect by themselves (forever, every reconnect_wait_s); while NATS is down a call fails with
fleet.errors.TransportError saying what failed, and the next call after the reconnect works. Key-value writes
are plain JetStream publishes to `$KV.<bucket>.<key>`, which is what lets many of them share one round trip.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator, Iterable, Mapping

import nats
import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from fleet.errors import ConflictError, ProtocolError, TransportError
from fleet.protocol import (BUCKET_DESIRED, BUCKET_DEVICES, BUCKET_ROLLOUTS, COMMAND_KEY_PREFIX,
                            REPORT_SUBJECT_PREFIX, REPORT_SUBJECTS, STREAM_REPORTS, Command, DesiredState,
                            InvalidReport, Registration, Report, check_token, report_subject)

log = logging.getLogger("fleet.transport")

DEFAULT_DURABLE = "edgestack-controller"
REPORT_MAX_AGE_S = 7 * 24 * 3600.0
REPORT_MAX_BYTES = 1 << 30
REPORT_MAX_MSG_BYTES = 64 << 10
PIPELINE_TIMEOUT_S = 30.0
# A one-pass scan of a bucket (list rollouts every tick, registrations) is an ephemeral consumer: nats-py leaves
# it on the server for 5 minutes after the scan unless told otherwise, and a controller ticking twice a second
# would pile up hundreds of them ("maximum consumers limit reached").
SCAN_INACTIVE_S = 5.0


def _encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), default=str).encode()


def _decode(value: bytes | None, what: str) -> Any:
    try:
        return json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} is not JSON: {exc}") from exc


@contextlib.asynccontextmanager
async def _failing(what: str):
    """nats-py's errors (timeouts, closed or reconnecting connection, JetStream API errors) as TransportError."""
    try:
        yield
    except (ConflictError, ProtocolError, TransportError):
        raise
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise ConflictError(f"{what}: someone else wrote first ({exc.description})") from exc
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
        detail = getattr(exc, "description", None) or str(exc) or type(exc).__name__
        raise TransportError(f"{what}: {type(exc).__name__}: {detail}") from exc


class NatsFleetBus:
    """The fleet's bus on one NATS connection. Build with `await NatsFleetBus.connect(url)`."""

    def __init__(self, nc: nats.NATS, *, durable: str = DEFAULT_DURABLE) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=5.0)
        self.durable = durable
        self._kv: dict[str, KeyValue] = {}
        self._reports_sub = None

    @classmethod
    async def connect(cls, url: str | Iterable[str], *, name: str = "edgestack-fleet", ensure: bool = True,
                      durable: str = DEFAULT_DURABLE, connect_timeout_s: float = 2.0,
                      connect_deadline_s: float = 10.0, reconnect_wait_s: float = 0.5,
                      report_max_age_s: float = REPORT_MAX_AGE_S,
                      report_max_bytes: int = REPORT_MAX_BYTES) -> "NatsFleetBus":
        """Connect (a comma-separated list or iterable of URLs for a cluster) and, with ensure, create the buckets
        and the report stream when missing (idempotent; the stream's limits are updated when they changed)."""
        servers = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)

        outage = {"errors": 0}  # one line per outage, not one per reconnect attempt

        async def on_error(exc: Exception) -> None:
            outage["errors"] += 1
            if outage["errors"] == 1:
                log.warning("nats %s: %s: %s (said once until reconnected)", name, type(exc).__name__, exc)

        async def on_disconnected() -> None:
            if not (nc.is_closed or nc.is_draining):  # close() drains first: that is no outage
                log.warning("nats %s: disconnected, reconnecting", name)

        async def on_reconnected() -> None:
            outage["errors"] = 0
            log.info("nats %s: reconnected to %s", name, nc.connected_url.netloc if nc.connected_url else "?")

        # nats-py retries a first connect forever with max_reconnect_attempts=-1: the deadline bounds it.
        async with _failing(f"connect to NATS at {','.join(servers)} within {connect_deadline_s:g}s"):
            nc = await asyncio.wait_for(
                nats.connect(servers, name=name, connect_timeout=connect_timeout_s, allow_reconnect=True,
                             max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait_s, error_cb=on_error,
                             disconnected_cb=on_disconnected, reconnected_cb=on_reconnected),
                connect_deadline_s)
        bus = cls(nc, durable=durable)
        try:
            if ensure:
                await bus.ensure(report_max_age_s=report_max_age_s, report_max_bytes=report_max_bytes)
        except BaseException:
            await nc.close()
            raise
        return bus

    async def ensure(self, *, report_max_age_s: float = REPORT_MAX_AGE_S,
                     report_max_bytes: int = REPORT_MAX_BYTES) -> None:
        for bucket in (BUCKET_DESIRED, BUCKET_DEVICES, BUCKET_ROLLOUTS):
            async with _failing(f"create bucket {bucket}"):
                try:
                    self._kv[bucket] = await self.js.key_value(bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._kv[bucket] = await self.js.create_key_value(
                        bucket=bucket, history=1, storage=api.StorageType.FILE)
        config = api.StreamConfig(name=STREAM_REPORTS, subjects=[REPORT_SUBJECTS], storage=api.StorageType.FILE,
                                  retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
                                  max_age=report_max_age_s, max_bytes=report_max_bytes,
                                  max_msg_size=REPORT_MAX_MSG_BYTES)
        async with _failing(f"create stream {STREAM_REPORTS}"):
            try:
                info = await self.js.stream_info(STREAM_REPORTS)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
            else:
                if (info.config.max_age, info.config.max_bytes) != (report_max_age_s, report_max_bytes):
                    await self.js.update_stream(config)

    async def _bucket(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            async with _failing(f"open bucket {bucket}"):
                try:
                    self._kv[bucket] = await self.js.key_value(bucket)
                except nats.js.errors.BucketNotFoundError:
                    raise TransportError(f"bucket {bucket} does not exist: connect with ensure=True once") from None
        return self._kv[bucket]

    # -- desired state ---------------------------------------------------------------------------------------

    async def put_desired(self, device_id: str, desired: DesiredState) -> None:
        kv = await self._bucket(BUCKET_DESIRED)
        async with _failing(f"put desired state of {device_id}"):
            await kv.put(check_token(device_id, "device_id"), _encode(desired.to_dict()))

    async def put_desired_many(self, items: Mapping[str, DesiredState]) -> None:
        """Every write published at once, the acks awaited together; TransportError names the devices whose
        write was not acknowledged (the others are written)."""
        await self._bucket(BUCKET_DESIRED)
        prefix = f"$KV.{BUCKET_DESIRED}."
        ids = [check_token(device_id, "device_id") for device_id in items]
        futures = []
        async with _failing(f"publish desired states of {len(ids)} devices"):
            for device_id in ids:
                futures.append(await self.js.publish_async(prefix + device_id, _encode(items[device_id].to_dict())))
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), PIPELINE_TIMEOUT_S)
        failed = [(device_id, result) for device_id, result in zip(ids, done) if isinstance(result, BaseException)]
        if failed:
            first_id, first_error = failed[0]
            raise TransportError(f"desired state of {len(failed)} of {len(ids)} devices not written (first: "
                                 f"{first_id}: {type(first_error).__name__}: {first_error})")

    async def get_desired(self, device_id: str) -> DesiredState | None:
        kv = await self._bucket(BUCKET_DESIRED)
        async with _failing(f"get desired state of {device_id}"):
            try:
                entry = await kv.get(check_token(device_id, "device_id"))
            except nats.js.errors.KeyNotFoundError:
                return None
        return DesiredState.from_dict(_decode(entry.value, f"desired state of {device_id}"))

    async def watch_desired(self, device_id: str | None = None) -> AsyncIterator[tuple[str, DesiredState | None]]:
        """The current value of each key first, then every change; a value that does not parse is logged and
        skipped (the device keeps its last good desired state)."""
        kv = await self._bucket(BUCKET_DESIRED)
        what = f"watch desired state of {device_id or 'every device'}"
        async with _failing(what):
            watcher = await kv.watch(check_token(device_id, "device_id") if device_id else ">")
        try:
            async for entry in watcher:
                if entry is None:  # the end of the current values
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    yield entry.key, None
                    continue
                try:
                    desired = DesiredState.from_dict(_decode(entry.value, "desired state"))
                except ProtocolError as exc:
                    log.warning("desired state of %s at revision %s skipped: %s", entry.key, entry.revision, exc)
                    continue
                yield entry.key, desired
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    # -- registrations ---------------------------------------------------------------------------------------

    async def register(self, registration: Registration) -> None:
        kv = await self._bucket(BUCKET_DEVICES)
        async with _failing(f"register {registration.device_id}"):
            await kv.put(check_token(registration.device_id, "device_id"), _encode(registration.to_dict()))

    async def registrations(self) -> dict[str, Registration]:
        """One pass over the bucket (a watch delivering each key's last value), not one request per device."""
        kv = await self._bucket(BUCKET_DEVICES)
        found: dict[str, Registration] = {}
        async with _failing("list registrations"):
            watcher = await kv.watchall(ignore_deletes=True, inactive_threshold=SCAN_INACTIVE_S)
            try:
                while (entry := await watcher.updates(timeout=PIPELINE_TIMEOUT_S)) is not None:
                    try:
                        found[entry.key] = Registration.from_dict(_decode(entry.value, "registration"))
                    except ProtocolError as exc:
                        log.warning("registration of %s skipped: %s", entry.key, exc)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        return found

    # -- reports ---------------------------------------------------------------------------------------------

    async def publish_report(self, report: Report) -> None:
        async with _failing(f"publish report {report.seq} of {report.device_id}"):
            await self.js.publish(report_subject(report.device_id), _encode(report.to_dict()),
                                  stream=STREAM_REPORTS)

    async def publish_reports(self, reports: Iterable[Report]) -> None:
        """Many devices' reports pipelined (the simulator's way); TransportError when any was not stored."""
        reports = list(reports)
        async with _failing(f"publish {len(reports)} reports"):
            futures = [await self.js.publish_async(report_subject(r.device_id), _encode(r.to_dict()))
                       for r in reports]
            done = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), PIPELINE_TIMEOUT_S)
        failed = [r.device_id for r, result in zip(reports, done) if isinstance(result, BaseException)]
        if failed:
            raise TransportError(f"{len(failed)} of {len(reports)} reports not stored (first: {failed[0]})")

    async def fetch_reports(self, max_messages: int = 10_000,
                            timeout_s: float = 0.5) -> list[Report | InvalidReport]:
        async with _failing(f"fetch reports (consumer {self.durable})"):
            if self._reports_sub is None:
                config = api.ConsumerConfig(ack_policy=api.AckPolicy.ALL, max_ack_pending=-1, ack_wait=60.0,
                                            deliver_policy=api.DeliverPolicy.ALL)
                self._reports_sub = await self.js.pull_subscribe(REPORT_SUBJECTS, durable=self.durable,
                                                                 stream=STREAM_REPORTS, config=config)
            try:
                messages = await self._reports_sub.fetch(batch=max_messages, timeout=timeout_s)
            except asyncio.TimeoutError:  # nothing arrived in time (nats-py raises either TimeoutError)
                if self.nc.is_connected:
                    return []
                raise
            if messages:
                await messages[-1].ack()  # AckPolicy.ALL: acknowledges the whole batch
        return [parse_report(m.subject, m.data) for m in messages]

    # -- rollouts and commands -------------------------------------------------------------------------------

    async def load_rollout(self, rollout_id: str) -> tuple[dict[str, Any] | None, int]:
        kv = await self._bucket(BUCKET_ROLLOUTS)
        async with _failing(f"load rollout {rollout_id}"):
            try:
                entry = await kv.get(check_token(rollout_id, "rollout_id"))
            except nats.js.errors.KeyNotFoundError:
                return None, 0
        return _decode(entry.value, f"rollout {rollout_id} record"), entry.revision

    async def save_rollout(self, rollout_id: str, record: Mapping[str, Any], revision: int) -> int:
        kv = await self._bucket(BUCKET_ROLLOUTS)
        key, value = check_token(rollout_id, "rollout_id"), _encode(record)
        async with _failing(f"save rollout {rollout_id} at revision {revision}"):
            if revision == 0:
                return await kv.create(key, value)
            return await kv.update(key, value, last=revision)

    async def list_rollouts(self) -> list[str]:
        kv = await self._bucket(BUCKET_ROLLOUTS)
        keys: list[str] = []
        async with _failing("list rollouts"):
            watcher = await kv.watchall(ignore_deletes=True, meta_only=True, inactive_threshold=SCAN_INACTIVE_S)
            try:
                while (entry := await watcher.updates(timeout=PIPELINE_TIMEOUT_S)) is not None:
                    keys.append(entry.key)
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        return sorted(k for k in keys if not k.startswith(COMMAND_KEY_PREFIX))

    async def put_command(self, rollout_id: str, command: Command) -> None:
        kv = await self._bucket(BUCKET_ROLLOUTS)
        async with _failing(f"put command {command.command} for rollout {rollout_id}"):
            await kv.put(COMMAND_KEY_PREFIX + check_token(rollout_id, "rollout_id"), _encode(command.to_dict()))

    async def get_command(self, rollout_id: str) -> Command | None:
        kv = await self._bucket(BUCKET_ROLLOUTS)
        async with _failing(f"get command of rollout {rollout_id}"):
            try:
                entry = await kv.get(COMMAND_KEY_PREFIX + check_token(rollout_id, "rollout_id"))
            except nats.js.errors.KeyNotFoundError:
                return None
        return Command.from_dict(_decode(entry.value, f"command of rollout {rollout_id}"))

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 5.0)
        if not self.nc.is_closed:
            await self.nc.close()


def parse_report(subject: str, data: bytes) -> Report | InvalidReport:
    """One report message: the device is the subject's last token; anything that does not parse, or claims
    another device than its subject, is an InvalidReport for the subject's device."""
    device_id = subject[len(REPORT_SUBJECT_PREFIX):] if subject.startswith(REPORT_SUBJECT_PREFIX) else subject
    try:
        report = Report.from_dict(_decode(data, "report"))
    except ProtocolError as exc:
        return InvalidReport(device_id, str(exc))
    if report.device_id != device_id:
        return InvalidReport(device_id, f"report.device_id {report.device_id!r} is not the subject's {device_id!r}")
    return report
