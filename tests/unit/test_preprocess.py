"""Unit tests for backends.preprocess: decoding, model-input geometry and the array-generic GPU code."""
from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from backends.common.geometry import map_boxes_to_original
from backends.errors import InvalidImageError, InvalidTensorError
from backends.preprocess.gpu_ops import gpu_available, prepare_input_xp, resize_bilinear
from backends.preprocess.image_ops import DecodeLimits, InputSpec, decode_image, prepare_input

REPO = Path(__file__).resolve().parents[2]
FIXTURES = next(
    (p for p in (REPO / "shared/fixtures/images", REPO.parent / "shared/fixtures/images") if p.is_dir()), None
)
LIMITS = DecodeLimits()


def fixture_paths() -> list[Path]:
    return sorted(FIXTURES.iterdir()) if FIXTURES else []


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB but whose data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_with_box(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    rgb = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    rgb[y1:y2, x1:x2] = 255
    return rgb


# --- geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orig_hw, input_hw, mode",
    [
        ((480, 640), (640, 640), "letterbox"),
        ((480, 640), (384, 512), "stretch"),
        ((600, 400), (320, 480), "letterbox"),
        ((600, 400), (320, 480), "stretch"),
        ((300, 500), (640, 640), "letterbox"),
        ((300, 500), (416, 736), "stretch"),
    ],
)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_box_maps_back_to_original(orig_hw, input_hw, mode, layout):
    h, w = orig_hw
    box = (int(w * 0.3), int(h * 0.25), int(w * 0.7), int(h * 0.6))
    spec = InputSpec(*input_hw, layout=layout, resize=mode, scale=1 / 255)
    x, t = prepare_input(image_with_box(h, w, box), spec)
    plane = x[0] if layout == "NCHW" else x[..., 0]
    ys, xs = np.nonzero(plane > 0.5)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    np.testing.assert_allclose(map_boxes_to_original(found, t)[0], box, atol=2)


@pytest.mark.parametrize("orig_hw, pad_axis", [((300, 600), 0), ((600, 300), 1)])
def test_letterbox_pads_with_pad_value_and_centres(orig_hw, pad_axis):
    spec = InputSpec(640, 640, dtype="uint8", resize="letterbox", pad_value=114)
    x, t = prepare_input(np.full(orig_hw + (3,), 200, np.uint8), spec)
    assert x.shape == (640, 640, 3) and (t.resized_h, t.resized_w) == ((320, 640) if pad_axis == 0 else (640, 320))
    profile = x[:, 320, 0] if pad_axis == 0 else x[320, :, 0]
    assert (profile[:160] == 114).all() and (profile[160:480] == 200).all() and (profile[480:] == 114).all()
    assert (t.pad_y, t.pad_x) == ((160.0, 0.0) if pad_axis == 0 else (0.0, 160.0))


def test_nchw_is_transposed_nhwc():
    rgb = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for dtype in ("uint8", "float32", "float16"):
        scale = 1.0 if dtype == "uint8" else 1 / 255
        nhwc, _ = prepare_input(rgb, InputSpec(200, 300, dtype=dtype, scale=scale))
        nchw, _ = prepare_input(rgb, InputSpec(200, 300, layout="NCHW", dtype=dtype, scale=scale))
        assert nhwc.shape == (200, 300, 3) and nchw.shape == (3, 200, 300)
        assert nchw.flags.c_contiguous and nhwc.flags.c_contiguous
        np.testing.assert_array_equal(nchw, nhwc.transpose(2, 0, 1))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_channel_order(layout):
    rgb = np.empty((32, 32, 3), np.uint8)
    rgb[:] = (10, 20, 30)
    for order, expected in (("RGB", (10, 20, 30)), ("BGR", (30, 20, 10))):
        x, _ = prepare_input(rgb, InputSpec(16, 16, layout=layout, channel_order=order, dtype="uint8"))
        channels = x[:, 0, 0] if layout == "NCHW" else x[0, 0]
        assert tuple(channels) == expected


@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_scale_mean_std_in_spec_channel_order(order, layout):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = np.empty((20, 20, 3), np.uint8)
    rgb[:] = (10, 20, 250)
    spec = InputSpec(20, 20, layout=layout, channel_order=order, scale=1 / 255, mean=mean, std=std)
    x, _ = prepare_input(rgb, spec)
    pixels = np.array((10, 20, 250) if order == "RGB" else (250, 20, 10), np.float64)
    expected = (pixels / 255 - mean) / std
    got = x[:, 5, 5] if layout == "NCHW" else x[5, 5]
    assert x.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_raw_pixel_values_and_dtypes():
    rgb = np.random.default_rng(2).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    reference = cv2.resize(rgb, (64, 48), interpolation=cv2.INTER_LINEAR)
    u8, _ = prepare_input(rgb, InputSpec(48, 64, dtype="uint8"))
    f32, _ = prepare_input(rgb, InputSpec(48, 64))
    f16, _ = prepare_input(rgb, InputSpec(48, 64, dtype="float16", scale=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert (u8.dtype, f32.dtype, f16.dtype) == (np.uint8, np.float32, np.float16)
    np.testing.assert_array_equal(u8, reference)
    np.testing.assert_array_equal(f32, reference.astype(np.float32))
    np.testing.assert_allclose(f16, reference / 127.5 - 1, atol=1e-3)


def test_same_size_uint8_needs_no_work():
    rgb = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x, t = prepare_input(rgb, InputSpec(64, 64, dtype="uint8"))
    np.testing.assert_array_equal(x, rgb)
    assert (t.scale_x, t.scale_y, t.pad_x, t.pad_y) == (1.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 0}, "height must be a positive integer"),
        ({"layout": "CHW"}, "layout must be one of"),
        ({"channel_order": "rgb"}, "channel_order must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"resize": "crop"}, "resize must be one of"),
        ({"pad_value": 256}, "pad_value must be an integer in 0..255"),
        ({"scale": 0}, "scale must be a positive finite number"),
        ({"mean": (0, 0)}, "mean must be 3 finite numbers"),
        ({"std": (1, 0, 1)}, "std must be positive"),
        ({"dtype": "uint8", "scale": 1 / 255}, "dtype uint8 needs scale=1"),
    ],
)
def test_input_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InputSpec(**{"height": 640, "width": 640, **kwargs})


def test_input_spec_accepts_lists_and_decode_limits_validate():
    assert InputSpec(8, 8, mean=[0.1, 0.2, 0.3]).mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="min_side 100 is over max_side 50"):
        DecodeLimits(max_side=50, min_side=100)
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        DecodeLimits(max_bytes=0)


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)])
def test_prepare_input_rejects_non_rgb(bad):
    with pytest.raises(InvalidTensorError):
        prepare_input(bad, InputSpec(8, 8))


# --- decode --------------------------------------------------------------------------------------


def test_exif_orientation_6_is_rotated():
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # red patch at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb = decode_image(encode(img, "JPEG", exif=exif, quality=95), LIMITS)
    assert rgb.shape == (64, 32, 3)  # displayed 32 wide x 64 tall
    top_right, top_left = rgb[2:14, 18:30].mean(axis=(0, 1)), rgb[2:14, 2:14].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[2] < 50  # rotated 90 degrees clockwise: red is now top-right
    assert top_left[0] < 50 and top_left[2] > 200


def test_grayscale_png():
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    rgb = decode_image(encode(Image.fromarray(gray, "L")), LIMITS)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)


def test_rgba_png_drops_alpha():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:10, :, 3] = 255  # top half opaque, bottom half fully transparent
    rgb = decode_image(encode(Image.fromarray(rgba, "RGBA")), LIMITS)
    assert (rgb == (200, 100, 50)).all()


def test_palette_png_with_transparency():
    img = Image.new("P", (20, 20), 1)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 10, 20))
    rgb = decode_image(encode(img, transparency=0), LIMITS)
    assert (rgb[:, :10] == (255, 0, 0)).all() and (rgb[:, 10:] == (0, 255, 0)).all()


def test_16bit_grayscale_png_is_scaled():
    values = np.array([0, 128, 129, 32896, 65535], np.uint16)
    img = Image.fromarray(np.tile(values.repeat(4), (20, 1)))
    data = encode(img)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    rgb = decode_image(data, LIMITS)
    np.testing.assert_array_equal(rgb[0, ::4, 0], [0, 0, 1, 128, 255])
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize(
    "img, fmt, expected",
    [
        (Image.new("LA", (16, 16), (77, 0)), "PNG", (77, 77, 77)),
        (Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        (Image.new("I", (16, 16), 65535 * 2), "TIFF", (255, 255, 255)),  # 32-bit: clipped to 16 bit first
        (Image.new("F", (16, 16), 1.6), "TIFF", (2, 2, 2)),  # rounded, where Pillow would truncate to 1
    ],
)
def test_other_modes(img, fmt, expected):
    assert (decode_image(encode(img, fmt), LIMITS) == expected).all()


def valid_jpeg() -> bytes:
    rgb = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(rgb), "JPEG")


@pytest.mark.parametrize(
    "data, limits, message",
    [
        (b"", LIMITS, "empty image bytes"),
        (np.random.default_rng(5).bytes(1000), LIMITS, r"not a decodable image \(JPEG/PNG/"),
        (encode(Image.new("RGB", (16, 16)), "ICO"), LIMITS, "not a decodable image"),  # format not allowed
        (valid_jpeg()[: len(valid_jpeg()) // 2], LIMITS, "image is truncated or corrupt: "),
        (encode(Image.new("RGB", (1, 1))), LIMITS, "image 1x1 is smaller than the minimum side 16"),
        (encode(Image.new("RGB", (40, 10))), LIMITS, "image 40x10 is smaller than the minimum side 16"),
        (png_header(8000, 6000), LIMITS, "image 8000x6000 has 48000000 pixels, over the limit of 40000000"),
        (valid_jpeg(), DecodeLimits(max_bytes=100), r"encoded image is \d+ bytes, over the limit of 100"),
    ],
)
def test_decode_errors(data, limits, message):
    with pytest.raises(InvalidImageError, match=message):
        decode_image(data, limits)


def test_truncated_png_is_an_error():
    data = encode(Image.fromarray(np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InvalidImageError, match="image is truncated or corrupt"):
        decode_image(data[: len(data) * 2 // 3], LIMITS)


def test_real_png_over_max_side():
    data = encode(Image.new("1", (10000, 10000)))  # ~12 kB, writes in well under a second
    with pytest.raises(InvalidImageError, match="image 10000x10000 exceeds the maximum side 8192"):
        decode_image(data, LIMITS)


def test_bomb_header_rejected_before_pixels_are_decoded(monkeypatch):
    loads = []
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load
        monkeypatch.setattr(cls, "load", lambda self, _orig=original: loads.append(self) or _orig(self))
    data = png_header(100_000, 100_000)  # 10^10 pixels (30 GB) claimed in ~100 bytes
    with pytest.raises(InvalidImageError, match="image 100000x100000 exceeds the maximum side 8192"):
        decode_image(data, LIMITS)
    # With the side limit out of the way our pixel check answers, not Pillow's DecompressionBombError.
    with pytest.raises(InvalidImageError, match="has 10000000000 pixels, over the limit of 40000000"):
        decode_image(data, DecodeLimits(max_side=200_000))
    assert loads == []
    decode_image(valid_jpeg(), LIMITS)
    assert loads  # the spy does see a real decode


@pytest.mark.skipif(FIXTURES is None, reason="fixture photographs not found")
@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.name)
def test_fixture_photos_decode(path):
    data = path.read_bytes()
    rgb = decode_image(data, LIMITS)
    with Image.open(path) as img:
        assert rgb.shape == (img.height, img.width, 3)
        assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        if path.name == "camera.png":
            assert img.mode == "L"
            gray = np.asarray(img)
            for c in range(3):
                np.testing.assert_array_equal(rgb[..., c], gray)
        else:
            np.testing.assert_array_equal(rgb, np.asarray(img.convert("RGB")))


# --- array-generic (GPU) code, checked with numpy -------------------------------------------------


@pytest.mark.parametrize("in_hw", [(17, 23), (480, 640), (427, 640), (100, 100), (3, 5)])
@pytest.mark.parametrize("out_hw", [(640, 640), (31, 47), (7, 640), (200, 150)])
def test_resize_bilinear_matches_cv2(in_hw, out_hw):
    rng = np.random.default_rng(in_hw[0] * 1000 + out_hw[1])
    for img in (rng.integers(0, 256, in_hw + (3,), dtype=np.uint8), rng.integers(0, 256, in_hw, dtype=np.uint8)):
        ours = resize_bilinear(np, img, *out_hw)
        assert ours.dtype == np.float32 and ours.shape == out_hw + img.shape[2:]
        theirs = cv2.resize(img, out_hw[::-1], interpolation=cv2.INTER_LINEAR)
        assert np.abs(np.rint(ours) - theirs).max() <= 1


@pytest.mark.parametrize("mode", ["stretch", "letterbox"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize(
    "dtype, order, scale, mean, std",
    [
        ("uint8", "RGB", 1.0, (0, 0, 0), (1, 1, 1)),
        ("float32", "BGR", 1 / 255, (0, 0, 0), (1, 1, 1)),
        ("float16", "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_generic_pipeline_matches_cpu(mode, layout, dtype, order, scale, mean, std):
    rgb = np.random.default_rng(7).integers(0, 256, (427, 640, 3), dtype=np.uint8)
    spec = InputSpec(480, 640, layout=layout, channel_order=order, dtype=dtype, resize=mode, scale=scale, mean=mean, std=std)
    cpu, t_cpu = prepare_input(rgb, spec)
    xp_out, t_xp = prepare_input_xp(np, rgb, spec)
    assert t_cpu == t_xp and xp_out.shape == cpu.shape and xp_out.dtype == cpu.dtype and xp_out.flags.c_contiguous
    lsb = scale / min(std)
    assert np.abs(xp_out.astype(np.float64) - cpu).max() <= lsb * 1.01 + 2e-3


def test_gpu_available_false_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert gpu_available() is False
