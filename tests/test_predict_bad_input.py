"""`navit_seq.predict` on the files users feed it: each case gives a result, or one line naming
the file and the reason, and never a half-written output. Images are generated here with PIL."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inference import tiny_detection_run

from navit_seq import config_utils, predict

REPO = Path(__file__).resolve().parent.parent
HUGE_SIDE = 10_000


def striped(width: int, height: int) -> Image.Image:
    """Red left half, blue right half: shows which way up an image was read."""
    image = Image.new("RGB", (width, height), (200, 0, 0))
    image.paste((0, 0, 200), (width // 2, 0, width, height))
    return image


def write_corrupt(path: Path) -> None:
    striped(64, 48).save(path.with_suffix(".full.png"))
    data = path.with_suffix(".full.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated download


def write_exif_rotated(path: Path) -> None:
    image = striped(40, 20)  # stored 40 wide, 20 high
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show": shown 20 wide, 40 high
    image.save(path, exif=exif, quality=95)


def write_palette(path: Path) -> None:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.save(path, transparency=0)  # index 0 transparent, as GIF-like PNGs are


# name -> (writes the file at `path`, file name, expected: (shape read, (H, W) of the file)
# or the reason in the error)
IMAGES = {
    "corrupt": (write_corrupt, "corrupt.png", "not a readable image (image file is truncated)"),
    "not an image": (lambda p: p.write_text("hello"), "notes.png",
                     "not a readable image (cannot identify image file"),
    "grayscale": (lambda p: Image.new("L", (30, 20), 90).save(p), "grey.png",
                  ((20, 30, 3), (20, 30))),
    "grayscale with alpha": (lambda p: Image.new("LA", (30, 20), (128, 255)).save(p),
                             "grey_alpha.png", ((20, 30, 3), (20, 30))),
    "RGBA": (lambda p: Image.new("RGBA", (30, 20), (10, 200, 30, 0)).save(p), "rgba.png",
             ((20, 30, 3), (20, 30))),
    "palette": (write_palette, "palette.png", ((20, 30, 3), (20, 30))),
    "16-bit PNG": (lambda p: Image.fromarray(np.full((20, 30), 51400, np.uint16)).save(p),
                   "sixteen.png", ((20, 30, 3), (20, 30))),
    "CMYK JPEG": (lambda p: Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(p), "cmyk.jpg",
                  ((20, 30, 3), (20, 30))),
    "EXIF-rotated JPEG": (write_exif_rotated, "exif.jpg", ((40, 20, 3), (40, 20))),
    "1x4000": (lambda p: Image.new("RGB", (1, 4000), (10, 200, 30)).save(p), "thin.png",
               ((predict.MAX_SIDE, 1, 3), (4000, 1))),
    "10000x10000": (lambda p: striped(HUGE_SIDE, HUGE_SIDE).save(p, quality=50), "huge.jpg",
                    ((predict.MAX_SIDE, predict.MAX_SIDE, 3), (HUGE_SIDE, HUGE_SIDE))),
    "0-byte file": (lambda p: p.write_bytes(b""), "empty.png", "the file is empty (0 bytes)"),
    "missing path": (lambda p: None, "missing.png", "no such file"),
}  # fmt: skip
READABLE = [name for name, (_, _, expected) in IMAGES.items() if isinstance(expected, tuple)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder holding every catalogue image (the missing one excepted), plus a text file."""
    folder = tmp_path_factory.mktemp("catalogue")
    for write, file_name, _ in IMAGES.values():
        write(folder / file_name)
    (folder / "corrupt.full.png").unlink()  # the intact original of the corrupt file
    (folder / "README.txt").write_text("not an image extension: ignored in a folder")
    return folder


@pytest.mark.parametrize("case", IMAGES)
def test_each_catalogue_image_reads_as_rgb_or_fails_naming_the_file(images, case):
    _, file_name, expected = IMAGES[case]
    path = images / file_name
    if isinstance(expected, str):
        with pytest.raises(ValueError) as error:
            predict.load_image(path)
        assert str(error.value).startswith(f"--image {path}: ") and expected in str(error.value)
        return
    pixels, size = predict.load_image(path)
    assert (pixels.shape, size) == expected and pixels.dtype == np.uint8


def test_pixels_are_converted_as_the_pipeline_converts_them(images):
    def first_pixel(name):
        return predict.load_image(images / name)[0][0, 0].tolist()

    assert first_pixel("grey.png") == [90, 90, 90]
    assert first_pixel("grey_alpha.png") == [128, 128, 128]
    assert first_pixel("rgba.png") == [10, 200, 30]  # alpha dropped
    assert first_pixel("palette.png") == [10, 200, 30]
    assert first_pixel("sixteen.png") == [51400 >> 8] * 3  # 16 -> 8 bits, not clipped to 255
    red, green, blue = first_pixel("cmyk.jpg")
    assert red > 200 and green < 50 and blue < 50


def test_exif_orientation_is_honoured(images):
    pixels, _ = predict.load_image(images / "exif.jpg")
    expected = np.asarray(striped(40, 20).transpose(Image.Transpose.ROTATE_270))  # [40, 20, 3]
    assert np.abs(pixels.astype(int) - expected).mean() < 10  # JPEG-close; red is now on top
    assert pixels[5, 10, 0] > 150 and pixels[35, 10, 2] > 150


def test_an_image_over_pils_decompression_bomb_limit_is_one_reason(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: over twice the limit
    with pytest.raises(ValueError, match=rf"--image {path}: .*decompression bomb.* Shrink"):
        predict.load_image(path)


def test_a_failed_write_leaves_no_output(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        predict.write_outputs(tmp_path / "out", Image.new("RGB", (4, 4)), {"boxes": []})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def workdir(scenes_data_dir, tmp_path_factory) -> Path:
    """A detection-only tiny Pix2Seq trained for 1 step (config.json as navit_seq.main saves)."""
    from navit_seq.train import loop, sequence

    config = tiny_detection_run(scenes_data_dir, steps=1)
    config.eval_every_steps = 0
    workdir = tmp_path_factory.mktemp("predict_bad_input")
    loop.train_and_evaluate(config, workdir, sequence.objective(config))
    config_utils.save_config(config, workdir / "config.json")
    return workdir


def workdir_without_checkpoint(data_dir: str, tmp_path: Path) -> Path:
    config_utils.save_config(tiny_detection_run(data_dir), tmp_path / "config.json")
    return tmp_path


def workdir_of_another_recipe(data_dir: str, tmp_path: Path) -> Path:
    config_utils.save_config(
        config_utils.load_config_file("configs/quickstart.py"), tmp_path / "config.json"
    )
    return tmp_path


# name -> (the --workdir to use, expected error)
WORKDIRS = {
    "no checkpoint": (workdir_without_checkpoint, "No checkpoint in"),
    "another recipe": (workdir_of_another_recipe,
                       "holds a run of trainer 'classification' (its config.json), not a Pix2Seq"),
    "never trained": (lambda data_dir, tmp_path: tmp_path, "no config.json; train there first"),
}  # fmt: skip


@pytest.mark.parametrize("case", WORKDIRS)
def test_each_unusable_workdir_is_one_reason_naming_it(scenes_data_dir, images, tmp_path, case):
    make, expected = WORKDIRS[case]
    unusable = make(scenes_data_dir, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        predict.main(["--workdir", str(unusable), "--image", str(images / "grey.png")])
    assert str(unusable) in str(error.value) and expected in str(error.value)
    assert not (unusable / "predictions").exists()


@pytest.mark.slow  # trains 1 step, then compiles the detection decoder: about 60 s on 2 cores
def test_a_folder_is_predicted_image_by_image_and_unreadable_ones_are_named(
    workdir, images, tmp_path, capsys
):
    output = tmp_path / "predictions"
    with pytest.raises(ValueError) as error:
        predict.main(["--workdir", str(workdir), "--image", str(images), "--output", str(output)])
    assert str(error.value) == (
        f"--image {images}: 3 of {len(READABLE) + 3} images were not predicted (each named "
        f"above); the other {len(READABLE)} are in {output}."
    )
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 3
    for case in ("corrupt", "not an image", "0-byte file"):
        _, file_name, reason = IMAGES[case]
        (line,) = [s for s in skipped if s.startswith(f"skipped --image {images / file_name}: ")]
        assert reason in line
    written = sorted(path.name for path in output.iterdir())
    stems = sorted(Path(IMAGES[case][1]).stem for case in READABLE)
    assert written == sorted([f"{s}.json" for s in stems] + [f"{s}.png" for s in stems])
    for case in READABLE:
        (height, width, _), _ = IMAGES[case][2]
        stem = Path(IMAGES[case][1]).stem
        assert Image.open(output / f"{stem}.png").size == (width, height)  # as read, upright
        assert {"boxes", "labels", "scores"} <= set(
            json.loads((output / f"{stem}.json").read_text())
        )
    assert f"(read at {predict.MAX_SIDE}x{predict.MAX_SIDE} of 10000x10000 pixels)" in captured.out


def test_a_bad_image_is_one_line_before_any_model_is_loaded(images, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "navit_seq.predict", "--workdir", str(tmp_path), "--image",
         str(images / "corrupt.png")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --image {images / 'corrupt.png'}: not a readable image (image file is truncated)."
    )
