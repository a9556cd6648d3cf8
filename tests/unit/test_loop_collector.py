"""The collector without NATS: dedup by content, invalid messages counted, counts, the COCO export."""
from __future__ import annotations

import io
import json

from PIL import Image

from loop.collector import Collector
from loop.sampler import make_sample
from loop.uncertainty import ImageUncertainty
from loop.wire import sample_subject


def jpeg(color: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (color, 0, 0)).save(out, "JPEG")
    return out.getvalue()


def a_sample(color: int, device: str, version: str, classes=(0,)):
    boxes = [[1.0, 2.0, 30.0, 40.0]] * len(classes)
    u = ImageUncertainty(tuple(1.2 for _ in classes), tuple(0.1 for _ in classes), 0.4, "entropy 1.20 bits > 0.9")
    return make_sample(jpeg(color), (boxes, [0.4] * len(classes), list(classes)), u, ("cat", "dog"), device, version)


def test_store_dedup_counts_and_coco_export(tmp_path):
    collector = Collector(tmp_path / "store")
    first = a_sample(10, "edge-1", "1.0.0", (0, 1))
    assert collector.ingest(sample_subject("edge-1"), first.encode()) == "stored"
    assert collector.ingest(sample_subject("edge-1"), first.encode()) == "duplicate"
    same_image_other_device = make_sample(first.image, ([], [], []), ImageUncertainty((), (), None, "x"), ("cat",),
                                          "edge-2", "1.0.0")
    assert collector.ingest(sample_subject("edge-2"), same_image_other_device.encode()) == "duplicate"
    assert collector.ingest(sample_subject("edge-2"), a_sample(20, "edge-2", "1.1.0", (1,)).encode()) == "stored"
    assert collector.ingest(sample_subject("edge-2"), b"junk") == "invalid"
    stats = collector.stats()
    assert stats["images"] == 2
    assert stats["by_device"] == {"edge-1": 1, "edge-2": 1}
    assert stats["by_model_version"] == {"1.0.0": 1, "1.1.0": 1}
    assert stats["by_class"] == {"dog": 2, "cat": 1}
    assert stats["this_run"] == {"stored": 2, "duplicate": 2, "invalid": 1}
    assert len(list((tmp_path / "store" / "objects").rglob("*.jpg"))) == 2

    task = json.loads(collector.export_coco(tmp_path / "task", ("cat", "dog", "bird")).read_text())
    assert [c["name"] for c in task["categories"]] == ["cat", "dog", "bird"]
    assert {(i["width"], i["height"]) for i in task["images"]} == {(64, 48)}
    assert len(task["annotations"]) == 3
    ann = task["annotations"][0]
    assert ann["bbox"] == [1.0, 2.0, 29.0, 38.0] and ann["category_id"] in (1, 2)
    for image in task["images"]:
        assert (tmp_path / "task" / image["file_name"]).read_bytes()[:3] == b"\xff\xd8\xff"
    collector.close()


def test_cli_stats_export_and_an_unreachable_cloud(tmp_path, capsys):
    from edgestack.cli import main

    collector = Collector(tmp_path / "store")
    collector.ingest(sample_subject("edge-1"), a_sample(30, "edge-1", "1.0.0").encode())
    collector.close()
    assert main(["samples", "stats", "--store", str(tmp_path / "store")]) == 0
    assert json.loads(capsys.readouterr().out)["by_device"] == {"edge-1": 1}
    assert main(["samples", "export", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "task")]) == 0
    assert json.loads((tmp_path / "task" / "annotations.json").read_text())["images"][0]["device_id"] == "edge-1"
    capsys.readouterr()
    assert main(["samples", "upload", "--spool", str(tmp_path / "spool"), "--nats", "nats://127.0.0.1:9",
                 "--once"]) == 2
    assert "cannot connect to NATS at nats://127.0.0.1:9" in capsys.readouterr().err
