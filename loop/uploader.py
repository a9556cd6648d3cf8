"""Device -> cloud: the spool's samples published to JetStream whenever the cloud side is reachable.

Uploader.drain() publishes the spool oldest first and removes each sample once JetStream acknowledged it (stored
on the server, so it survives the collector being down too); the first failure ends the pass and the sample stays.
Uploader.run() connects (retrying until stop, so a device that starts during an outage uploads once the cloud
is back), drains every poll_s and after each outage: nothing in the spool is lost by an outage or a restart.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable

import nats
import nats.errors
import nats.js.errors

from loop.errors import LoopError
from loop.spool import Spool
from loop.wire import ensure_samples_stream, sample_subject, STREAM_SAMPLES

log = logging.getLogger(__name__)
ACK_TIMEOUT_S = 5.0


class Uploader:
    def __init__(self, spool: Spool, url: str, *, device_id: str | None = None, poll_s: float = 0.5,
                 retry_s: float = 1.0) -> None:
        self.spool, self.url, self.device_id = spool, url, device_id
        self.poll_s, self.retry_s = poll_s, retry_s
        self.counts = {"uploaded": 0, "failures": 0}
        self.nc = None
        self.js = None

    async def connect(self, timeout_s: float = 2.0) -> None:
        servers = [u.strip() for u in self.url.split(",")]
        try:
            self.nc = await asyncio.wait_for(nats.connect(servers, name="edgestack-uploader", connect_timeout=timeout_s,
                                                          allow_reconnect=True, max_reconnect_attempts=-1,
                                                          reconnect_time_wait=0.5, error_cb=_quiet), timeout_s * 2)
        except Exception as exc:  # noqa: BLE001 - run() retries; --once reports it
            raise LoopError(f"cannot connect to NATS at {self.url}: {type(exc).__name__}: {exc}") from None
        self.js = self.nc.jetstream(timeout=ACK_TIMEOUT_S)
        await ensure_samples_stream(self.js)

    async def drain(self) -> int:
        """Publish the spool's samples; how many were stored (and removed from the spool) in this pass."""
        done = 0
        for path, sample in self.spool.items():
            device = self.device_id or str(sample.meta.get("device_id", ""))
            try:
                await self.js.publish(sample_subject(device), sample.encode(), stream=STREAM_SAMPLES,
                                      headers={"Nats-Msg-Id": path.name})
            except (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError, OSError) as exc:
                self.counts["failures"] += 1
                log.info("upload of %s failed (kept in the spool): %s: %s", path.name, type(exc).__name__, exc)
                break
            self.spool.remove(path)
            done += 1
        self.counts["uploaded"] += done
        return done

    async def run(self, should_stop: Callable[[], bool]) -> None:
        """Connect and drain until should_stop(); outages only delay the samples."""
        while not should_stop():
            if self.nc is None or self.nc.is_closed:
                try:
                    await self.connect()
                except Exception as exc:  # noqa: BLE001 - the cloud is unreachable: try again later
                    log.info("cloud not reachable (%s: %s); retrying in %gs", type(exc).__name__, exc, self.retry_s)
                    await self.close()
                    await asyncio.sleep(self.retry_s)
                    continue
            try:
                await self.drain()
            except Exception as exc:  # noqa: BLE001
                log.info("upload pass failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.poll_s)
        await self.close()

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5.0)
        self.nc = None


async def _quiet(exc: Exception) -> None:
    log.debug("nats uploader: %s: %s", type(exc).__name__, exc)
