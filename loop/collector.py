"""The cloud side: samples from the devices into a local object store, counted, exported for labelling.

    <store>/objects/<sha[:2]>/<sha>.<ext>   each image once, named by its content hash (sha256)
    <store>/index.sqlite3                   one row per distinct image: device, model version, time, reason,
                                            the device's predictions (pre-labels) and the image's size

Collector.ingest() takes one message: a duplicate image (same content, from any device, or redelivered) is
acknowledged and counted as a duplicate, a malformed one is counted as invalid (logged with the field) and
acknowledged too - it would come back forever otherwise. run() reads the stream through a durable pull consumer,
so samples published while the collector was down are read when it starts. export_coco() writes a COCO-format
labelling task: images, the devices' predictions as pre-annotations (with score, entropy and margin), categories.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from loop.errors import LoopError, SampleError
from loop.spool import Sample
from loop.wire import COLLECTOR_DURABLE, SAMPLE_SUBJECTS, STREAM_SAMPLES, ensure_samples_stream, parse_sample

log = logging.getLogger(__name__)
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}
SCHEMA = """CREATE TABLE IF NOT EXISTS samples (
  sha256 TEXT PRIMARY KEY, device_id TEXT NOT NULL, model_version TEXT NOT NULL, time TEXT NOT NULL,
  reason TEXT, predictions TEXT NOT NULL, file TEXT NOT NULL, width INTEGER, height INTEGER,
  received_at TEXT DEFAULT CURRENT_TIMESTAMP)"""


class Collector:
    def __init__(self, store: Path | str) -> None:
        self.store = Path(store)
        (self.store / "objects").mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.store / "index.sqlite3")
        self.db.execute(SCHEMA)
        self.db.commit()
        self.counts = Counter()

    def ingest(self, subject: str, data: bytes) -> str:
        """One message -> "stored", "duplicate" or "invalid"."""
        try:
            sample = parse_sample(subject, data)
        except SampleError as exc:
            self.counts["invalid"] += 1
            log.warning("sample on %s skipped: %s", subject, exc)
            return "invalid"
        return self.add(sample)

    def add(self, sample: Sample) -> str:
        m = sample.meta
        sha = m["sample_id"]
        if self.db.execute("SELECT 1 FROM samples WHERE sha256 = ?", (sha,)).fetchone():
            self.counts["duplicate"] += 1
            return "duplicate"
        rel = Path("objects") / sha[:2] / (sha + EXTENSIONS.get(m.get("content_type", ""), ".bin"))
        path = self.store / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(sample.image)
        tmp.replace(path)
        width, height = _image_size(sample.image)
        self.db.execute("INSERT INTO samples (sha256, device_id, model_version, time, reason, predictions, file, "
                        "width, height) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (sha, m["device_id"], m["model_version"], m["time"], m.get("reason"),
                         json.dumps(m["predictions"]), str(rel), width, height))
        self.db.commit()
        self.counts["stored"] += 1
        return "stored"

    def stats(self) -> dict[str, Any]:
        """Distinct images in the store, per device, per model version, and per class (images showing it)."""
        rows = self.db.execute("SELECT device_id, model_version, predictions FROM samples").fetchall()
        by_class: Counter = Counter()
        for _, _, predictions in rows:
            by_class.update({p["class_name"] for p in json.loads(predictions)})
        return {"images": len(rows), "by_device": dict(Counter(r[0] for r in rows)),
                "by_model_version": dict(Counter(r[1] for r in rows)), "by_class": dict(by_class.most_common()),
                "this_run": dict(self.counts)}

    def export_coco(self, out: Path | str, class_names: Sequence[str] = ()) -> Path:
        """A COCO labelling task in out: annotations.json and images/ (copies of the stored images). Categories:
        class_names (id = index + 1) when given, else the classes the predictions name."""
        out = Path(out)
        (out / "images").mkdir(parents=True, exist_ok=True)
        rows = self.db.execute("SELECT sha256, device_id, model_version, time, reason, predictions, file, width, "
                               "height FROM samples ORDER BY time, sha256").fetchall()
        names = {i: n for i, n in enumerate(class_names)}
        for row in rows:
            for p in json.loads(row[5]):
                names.setdefault(p["class_id"], p["class_name"])
        images, annotations = [], []
        for image_id, (sha, device, version, time_, reason, predictions, file, width, height) in enumerate(rows, 1):
            name = Path(file).name
            target = out / "images" / name
            if not target.exists():
                target.write_bytes((self.store / file).read_bytes())
            images.append({"id": image_id, "file_name": f"images/{name}", "width": width, "height": height,
                           "sha256": sha, "device_id": device, "model_version": version, "captured": time_,
                           "reason": reason})
            for p in json.loads(predictions):
                x1, y1, x2, y2 = p["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": p["class_id"] + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": max(0.0, (x2 - x1) * (y2 - y1)), "iscrowd": 0, "score": p["score"],
                                    "attributes": {"entropy": p.get("entropy"), "margin": p.get("margin"),
                                                   "source": "device prediction (pre-label)"}})
        task = {"info": {"description": "edgestack uncertain samples for labelling", "version": "1"},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in sorted(names.items())]}
        path = out / "annotations.json"
        path.write_text(json.dumps(task, indent=1))
        return path

    async def run(self, url: str, should_stop: Callable[[], bool], *, batch: int = 64, wait_s: float = 0.5,
                  on_stored: Callable[[str], None] | None = None) -> None:
        """Read the samples stream (durable consumer) until should_stop(); reconnects by itself."""
        import nats
        from nats.js import api

        try:  # nats-py retries a first connect forever with max_reconnect_attempts=-1: the deadline bounds it
            nc = await asyncio.wait_for(nats.connect([u.strip() for u in url.split(",")], name="edgestack-collector",
                                                     connect_timeout=2.0, allow_reconnect=True,
                                                     max_reconnect_attempts=-1, reconnect_time_wait=0.5), 10.0)
        except Exception as exc:  # noqa: BLE001
            raise LoopError(f"cannot connect to NATS at {url}: {type(exc).__name__}: {exc}") from None
        try:
            js = nc.jetstream(timeout=5.0)
            await ensure_samples_stream(js)
            config = api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=60.0,
                                        deliver_policy=api.DeliverPolicy.ALL)
            sub = await js.pull_subscribe(SAMPLE_SUBJECTS, durable=COLLECTOR_DURABLE, stream=STREAM_SAMPLES,
                                          config=config)
            while not should_stop():
                try:
                    messages = await sub.fetch(batch=batch, timeout=wait_s)
                except asyncio.TimeoutError:
                    continue
                except Exception as exc:  # noqa: BLE001 - the server is away: wait for the reconnect
                    log.info("fetch failed: %s: %s", type(exc).__name__, exc)
                    await asyncio.sleep(wait_s)
                    continue
                for message in messages:
                    outcome = self.ingest(message.subject, message.data)
                    await message.ack()
                    if on_stored is not None and outcome == "stored":
                        on_stored(message.subject)
        finally:
            await nc.close()

    def close(self) -> None:
        self.db.close()


def _image_size(image: bytes) -> tuple[int | None, int | None]:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(image)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - the size is a convenience for the labelling tool
        return None, None
