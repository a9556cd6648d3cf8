"""Per-image status in a batched request (backends/preprocess/batch.py), JPEGs decoded at reduced size (draft mode)
under a per-request pixel budget, and the router's handling of a failed image."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backends.common.detections import Detections
from backends.common.geometry import map_boxes_to_original
from backends.common.settings import DecodeLimits, InputSpec
from backends.errors import InvalidImageError
from backends.preprocess.batch import cpu_prepare, draft_side, prepare_batch
from backends.preprocess.image_ops import PixelBudget, decode_reduced, prepare_input
from backends.router.routing import Router
from tests.conftest import IMAGES

SPEC = InputSpec(height=512, width=512, layout="NHWC", dtype="float32")


def _jpeg(width: int, height: int, exif_orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    pixels = np.kron(rng.integers(0, 255, (height // 64, width // 64, 3), dtype=np.uint8), np.ones((64, 64, 1), np.uint8))
    out = io.BytesIO()
    image = Image.fromarray(pixels)
    if exif_orientation is None:
        image.save(out, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def _batch(fixture_images, bad_index: int, bad: bytes) -> list[bytes]:
    photos = sorted(p for p in fixture_images.iterdir() if p.suffix in (".jpg", ".png"))[:8]
    images = [p.read_bytes() for p in photos]
    images[bad_index] = bad
    return images


def test_one_truncated_image_of_eight_fails_alone_and_is_named_by_index(fixture_images):
    images = _batch(fixture_images, 3, (IMAGES / "dog.jpg").read_bytes()[:300])
    batch = prepare_batch(images, cpu_prepare(SPEC), SPEC, DecodeLimits(), draft_side(SPEC))
    assert [bool(s) for s in batch.statuses] == [False, False, False, True, False, False, False, False]
    assert batch.statuses[3].startswith("image 3: ")
    assert "0x" not in batch.statuses[3]  # no memory address of a BytesIO in the message
    assert len(batch.tensors) == 8 and {t.shape for t in batch.tensors} == {(512, 512, 3)}
    assert batch.transforms.shape == (8, 6)
    assert batch.status_array.shape == (8, 1) and batch.status_array[3, 0] == batch.statuses[3].encode()
    good = prepare_batch(images[:3], cpu_prepare(SPEC), SPEC, DecodeLimits(), draft_side(SPEC))
    for i in range(3):  # the good images' inputs do not depend on the bad one beside them
        assert np.array_equal(batch.tensors[i], good.tensors[i])


def test_a_request_whose_every_image_is_bad_fails_naming_each():
    with pytest.raises(InvalidImageError) as info:
        prepare_batch([b"", b"not an image"], cpu_prepare(SPEC), SPEC, DecodeLimits(), None)
    assert str(info.value).startswith("image 0: empty image bytes; image 1: not a decodable image")


def test_a_non_bytes_element_fails_only_itself():
    batch = prepare_batch([np.float32(1.0), (IMAGES / "dog.jpg").read_bytes()], cpu_prepare(SPEC), SPEC, DecodeLimits(), None)
    assert batch.statuses[0] == "image 0: expected encoded bytes, got float32" and batch.statuses[1] == ""


def test_images_past_the_request_pixel_budget_fail_alone():
    image = (IMAGES / "horses.jpg").read_bytes()  # 773 x 512
    one = 773 * 512
    limits = DecodeLimits(max_request_pixels=2 * one + 10)
    batch = prepare_batch([image, image, image, image], cpu_prepare(SPEC), SPEC, limits, None)
    assert [bool(s) for s in batch.statuses] == [False, False, True, True]
    assert batch.statuses[2].startswith("image 2: decoding 773x512 pixels would exceed the request's pixel budget")
    budget = PixelBudget(100)
    budget.spend(10, 10)
    with pytest.raises(InvalidImageError, match="0 pixels left"):
        budget.spend(1, 1)


def test_a_large_jpeg_is_decoded_at_reduced_size_and_boxes_map_to_its_original_pixels():
    data = _jpeg(4096, 2432)
    reduced = decode_reduced(data, DecodeLimits(), min_side=512)
    assert reduced.original_size == (2432, 4096)
    assert reduced.rgb.shape == (608, 1024, 3)  # 1/4: the smallest DCT scale keeping both sides >= 512
    full = decode_reduced(data, DecodeLimits())
    assert full.rgb.shape == (2432, 4096, 3)
    tensor_reduced, t_reduced = prepare_input(reduced.rgb, SPEC, reduced.original_size)
    tensor_full, t_full = prepare_input(full.rgb, SPEC)
    assert t_reduced == t_full
    assert np.abs(tensor_reduced.astype(np.float32) - tensor_full.astype(np.float32)).mean() < 4.0
    box = np.array([[128.0, 64.0, 256.0, 320.0]], np.float32)
    assert np.allclose(map_boxes_to_original(box, t_reduced), map_boxes_to_original(box, t_full))


def test_a_reduced_jpeg_rotated_by_exif_reports_its_rotated_original_size():
    reduced = decode_reduced(_jpeg(4096, 2432, exif_orientation=6), DecodeLimits(), min_side=512)
    assert reduced.original_size == (4096, 2432)
    assert reduced.rgb.shape == (1024, 608, 3)


def test_small_images_and_pngs_are_decoded_at_full_size():
    png = (IMAGES / "astronaut.png").read_bytes()
    assert decode_reduced(png, DecodeLimits(), min_side=64).rgb.shape == (512, 512, 3)
    small = (IMAGES / "dog.jpg").read_bytes()  # 768 x 576: halving would go under 512
    decoded = decode_reduced(small, DecodeLimits(), min_side=512)
    assert decoded.rgb.shape[:2] == decoded.original_size


def test_the_router_gives_a_failed_image_no_detections_and_no_cloud_call():
    called = []

    def cloud(image: bytes) -> Detections:
        called.append(image)
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    low = Detections(np.array([[1, 1, 5, 5]], np.float32), np.array([0.1], np.float32), np.array([3], np.int32))
    router = Router(0.5, cloud)
    try:
        routed = router.route([b"bad", b"good"], [low, low], failed=[True, False])
    finally:
        router.close()
    assert len(routed[0].detections) == 0 and routed[0].source == "edge" and not routed[0].degraded
    assert called == [b"good"] and routed[1].source == "cloud"


def test_the_builder_sizes_cpu_preprocess_instances_unless_the_spec_does():
    import dataclasses

    from builder.repository import target_for
    from builder.spec import load_spec
    from tests.conftest import SPEC as SPEC_FILE

    spec = load_spec(SPEC_FILE)
    target = target_for(spec)
    assert target.preprocess_instances == target.detector_instances + 1
    assert target_for(spec, detector_instances=3).preprocess_instances == 4
    assert target_for(spec, preprocess_instances=1).preprocess_instances == 1
    pinned = spec.replace(runtime=dataclasses.replace(spec.runtime, preprocess_instances=2))
    assert target_for(pinned).preprocess_instances == 2


def test_a_large_image_is_refused_as_busy_while_another_decodes(tmp_path):
    from backends.errors import BusyError
    from backends.preprocess.large_images import LargeImageGate

    first, second = LargeImageGate(100, tmp_path / "lock"), LargeImageGate(100, tmp_path / "lock")
    photos = [(IMAGES / "astronaut.png").read_bytes(), (IMAGES / "dog.jpg").read_bytes()]
    with first(101):  # another instance decodes a large image
        with second(100):  # not large: never refused
            pass
        with pytest.raises(BusyError, match="another large image"):
            with second(101):
                pass
        with pytest.raises(BusyError, match="^image 0: busy.*; image 1: busy"):
            prepare_batch(photos, cpu_prepare(SPEC), SPEC, DecodeLimits(), None, second)
        small_enough = LargeImageGate(1_000_000, tmp_path / "lock")
        assert prepare_batch(photos, cpu_prepare(SPEC), SPEC, DecodeLimits(), None, small_enough).statuses == ["", ""]
    with second(101):  # released when the other decode ends
        pass


def test_a_large_image_batched_with_other_requests_is_refused_as_busy(tmp_path):
    from backends.errors import BusyError
    from backends.preprocess.large_images import LargeImageGate

    refusing = LargeImageGate(300_000, tmp_path / "lock").refusing()
    photos = [(IMAGES / "astronaut.png").read_bytes(), (IMAGES / "dog.jpg").read_bytes()]  # 262,144 and 442,368 px
    batch = prepare_batch(photos, cpu_prepare(SPEC), SPEC, DecodeLimits(), None, refusing)
    assert batch.statuses[0] == "" and batch.statuses[1].startswith("image 1: busy: a large image")
    with pytest.raises(BusyError):
        prepare_batch(photos[1:], cpu_prepare(SPEC), SPEC, DecodeLimits(), None, refusing)


def test_a_large_image_is_decoded_in_the_lowest_priority_thread_and_a_small_one_here(tmp_path):
    import os
    import threading

    from backends.preprocess.large_images import LargeImageGate

    def where() -> tuple[int, int, int]:
        return threading.get_native_id(), os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    gate = LargeImageGate(100, tmp_path / "lock")
    with gate(100) as run:
        assert run(where) == where()  # an ordinary image: this thread, its priority
    with gate(101) as run:
        thread, policy, nice = run(where)
    assert thread != threading.get_native_id()
    assert policy == os.SCHED_IDLE or nice == 19
    assert where()[1:] != (policy, nice)  # the caller's own priority is left alone
    with gate(101) as run, pytest.raises(ZeroDivisionError):
        run(lambda: 1 / 0)  # an error in the worker reaches the caller

    photo = (IMAGES / "dog.jpg").read_bytes()  # 442,368 px: large for this gate, decoded in the worker
    large = LargeImageGate(300_000, tmp_path / "lock2")
    batch = prepare_batch([photo], cpu_prepare(SPEC), SPEC, DecodeLimits(), None, large)
    plain = prepare_batch([photo], cpu_prepare(SPEC), SPEC, DecodeLimits(), None, None)
    assert batch.statuses == [""] and np.array_equal(batch.tensors[0], plain.tensors[0])


def test_a_large_png_refused_as_busy_is_never_decoded(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    from backends.errors import BusyError
    from backends.preprocess.large_images import LargeImageGate

    loads = []
    real_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: loads.append(1) or real_load(self))
    png = (IMAGES / "astronaut.png").read_bytes()
    holder, gate = LargeImageGate(100, tmp_path / "lock"), LargeImageGate(100, tmp_path / "lock")
    with holder(101), pytest.raises(BusyError):
        prepare_batch([png], cpu_prepare(SPEC), SPEC, DecodeLimits(), None, gate)
    assert loads == []  # the header gave the size; the pixels were never decompressed
    assert prepare_batch([png], cpu_prepare(SPEC), SPEC, DecodeLimits(), None, gate).statuses == [""]
    assert loads
