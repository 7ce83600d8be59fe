"""Synthetic anomalies (spec §8): output contract, geometry, blending, texture sources, seeding."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onenip_pl.data.perlin import fractal_noise, perlin_noise, value_noise
from onenip_pl.data.synthesis import (
    AnomalySynthesizer,
    blend_texture,
    describe_texture_source,
    find_textures,
)
from onenip_pl.errors import ConfigError, DataError

DTD_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dtd_mini"
needs_dtd = pytest.mark.skipif(
    not (DTD_MINI / "images").is_dir(),
    reason=f"real DTD sample {DTD_MINI} not present (it ships with the shared/ reference material)",
)
SIZE = 128


def smooth_image(size: int, seed: int) -> np.ndarray:
    """A non-constant but plausible normal image."""
    field = value_noise((size, size), (5, 5), 3, np.random.default_rng(seed))
    return (40 + 180 * field).astype(np.uint8)


def solid(colour: tuple[int, int, int], shape: tuple[int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (*shape, 3)).copy()


def check_contract(image: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    size = image.shape[0]
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.float32
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    assert mask.sum() > 0, "synthetic anomalies must have a non-empty mask"
    outside = mask == 0
    np.testing.assert_array_equal(out[outside], image[outside])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return smooth_image(SIZE, 0)


@pytest.fixture(scope="module")
def synth() -> AnomalySynthesizer:
    return AnomalySynthesizer(SIZE)


@pytest.mark.parametrize("recipe", ["cutpaste_patch", "cutpaste_scar", "perlin_texture"])
def test_each_recipe_keeps_the_contract(synth, image, recipe):
    for seed in range(15):
        out, mask = getattr(synth, recipe)(image, np.random.default_rng(seed))
        check_contract(image, out, mask)
        assert np.any(out[mask == 1] != image[mask == 1]), "the anomaly must change the image"


def test_call_draws_all_recipes_about_as_the_spec_says(synth, image):
    rng = np.random.default_rng(3)
    counts = Counter()
    for _ in range(200):
        anomaly = synth.synthesize(image, rng)
        check_contract(image, anomaly.image, anomaly.mask)
        counts[anomaly.recipe] += 1
    assert set(counts) == {"cutpaste_patch", "cutpaste_scar", "perlin_texture"}
    assert 70 <= counts["perlin_texture"] <= 130
    assert 30 <= counts["cutpaste_scar"] <= 70 and 30 <= counts["cutpaste_patch"] <= 70


def test_cutpaste_prob_selects_the_recipe(image):
    only_cutpaste = AnomalySynthesizer(SIZE, cutpaste_prob=1.0)
    only_perlin = AnomalySynthesizer(SIZE, cutpaste_prob=0.0)
    rng = np.random.default_rng(0)
    assert {only_cutpaste.synthesize(image, rng).recipe for _ in range(20)} == {
        "cutpaste_patch",
        "cutpaste_scar",
    }
    assert {only_perlin.synthesize(image, rng).recipe for _ in range(20)} == {"perlin_texture"}


def test_patch_is_a_rectangle_of_2_to_15_percent(synth, image):
    for seed in range(30):
        _, mask = synth.cutpaste_patch(image, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert mask.sum() == height * width, "the patch mask must be one filled rectangle"
        assert 0.018 <= mask.mean() <= 0.155
        assert 0.28 <= width / height <= 3.5


def test_scar_is_a_thin_rotated_strip(synth, image):
    for seed in range(30):
        _, mask = synth.cutpaste_scar(image, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        assert 2 * 10 * 0.7 <= mask.sum() <= 16 * 25 * 1.3
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 30, "a 16x25 strip turned by at most 45° fits in 30 px"


def test_blend_formula_inside_and_outside_the_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    texture = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[2:5, 3:7] = 1.0
    beta = 0.3
    out = blend_texture(image, texture, mask, beta)
    m = mask[..., None]
    expected = image * (1 - m) + (1 - beta) * texture * m + beta * image * m
    assert np.abs(out - expected).max() <= 0.5 + 1e-3, "only rounding to uint8 may differ"
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])


def test_same_seed_same_sample_other_seed_other_sample(synth, image):
    for seed in range(6):
        first = synth.synthesize(image, np.random.default_rng(seed))
        again = synth.synthesize(image, np.random.default_rng(seed))
        other = synth.synthesize(image, np.random.default_rng(seed + 100))
        np.testing.assert_array_equal(first.image, again.image)
        np.testing.assert_array_equal(first.mask, again.mask)
        assert first.recipe == again.recipe
        assert not np.array_equal(first.mask, other.mask)


def test_global_random_state_is_untouched(synth, image):
    numpy_state, python_state = np.random.get_state(), random.getstate()
    for seed in range(10):
        synth(image, np.random.default_rng(seed))
    after = np.random.get_state()
    assert numpy_state[0] == after[0] and np.array_equal(numpy_state[1], after[1])
    assert numpy_state[2:] == after[2:]
    assert random.getstate() == python_state


def test_pickled_copy_gives_the_same_samples(image):
    synth = AnomalySynthesizer(SIZE, cutpaste_prob=0.0)
    synth(image, np.random.default_rng(0))
    copy = pickle.loads(pickle.dumps(synth))
    for seed in range(5):
        a, b = synth(image, np.random.default_rng(seed)), copy(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("size", [64, 100, 224])
def test_any_size_from_64_works(size):
    synth = AnomalySynthesizer(size)
    image = smooth_image(size, 1)
    rng = np.random.default_rng(size)
    for recipe in ("cutpaste_patch", "cutpaste_scar", "perlin_texture"):
        for _ in range(10):
            check_contract(image, *getattr(synth, recipe)(image, rng))


def inside_values(out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return out[mask == 1].astype(int)


def test_fallback_textures_are_used_before_procedural_ones():
    """On a flat image, a flat fallback texture stays flat under every op; a procedural one never is."""
    image = solid((90, 120, 150), (SIZE, SIZE))
    synth = AnomalySynthesizer(SIZE)
    fallback = [solid((250, 10, 200), (70, 90))]
    for seed in range(8):
        out, mask = synth.perlin_texture(image, np.random.default_rng(seed), fallback_textures=fallback)
        values = inside_values(out, mask)
        assert np.all(values.max(axis=0) - values.min(axis=0) <= 1)
        procedural, mask = synth.perlin_texture(image, np.random.default_rng(seed))
        assert inside_values(procedural, mask).std(axis=0).max() > 3


def test_texture_files_come_first(tmp_path):
    texture = tmp_path / "images" / "flat" / "flat_0001.png"
    texture.parent.mkdir(parents=True)
    Image.fromarray(solid((30, 200, 60), (50, 80))).save(texture)
    paths = find_textures(tmp_path)
    assert paths == [texture]
    synth = AnomalySynthesizer(SIZE, texture_paths=paths)
    image = solid((90, 120, 150), (SIZE, SIZE))
    varied = [smooth_image(SIZE, 5)]
    for seed in range(6):
        out, mask = synth.perlin_texture(image, np.random.default_rng(seed), fallback_textures=varied)
        values = inside_values(out, mask)
        assert np.all(values.max(axis=0) - values.min(axis=0) <= 1), "the flat texture file must be used"


def test_unreadable_texture_file_names_the_file(tmp_path):
    broken = tmp_path / "images" / "x" / "broken.jpg"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a jpeg")
    synth = AnomalySynthesizer(SIZE, texture_paths=[broken], cutpaste_prob=0.0)
    with pytest.raises(DataError, match="broken.jpg"):
        synth(smooth_image(SIZE, 0), np.random.default_rng(0))


@needs_dtd
def test_real_dtd_textures_are_found_and_blended():
    paths = find_textures(DTD_MINI)
    assert len(paths) == 40 and all(path.suffix == ".jpg" for path in paths)
    assert find_textures(DTD_MINI / "images") == paths
    synth = AnomalySynthesizer(SIZE, texture_paths=paths, cutpaste_prob=0.0)
    image = solid((90, 120, 150), (SIZE, SIZE))
    spreads = []
    for seed in range(10):
        out, mask = synth(image, np.random.default_rng(seed))
        check_contract(image, out, mask)
        spreads.append(inside_values(out, mask).std(axis=0).max())
    assert np.median(spreads) > 3, "real textures must bring their structure into the mask"
    assert "40 texture images" in synth.describe_texture_source()


def test_find_textures_errors_name_the_directory(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        find_textures(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        find_textures(missing)
    (tmp_path / "images" / "cls").mkdir(parents=True)
    (tmp_path / "images" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no texture images"):
        find_textures(tmp_path)


def test_texture_source_descriptions(tmp_path):
    paths = [tmp_path / "images" / "a" / "1.jpg", tmp_path / "images" / "b" / "2.jpg"]
    assert describe_texture_source(paths, None, "/data/dtd") == "2 texture images from /data/dtd"
    assert str(tmp_path / "images") in describe_texture_source(paths)
    assert "3 normal training images" in describe_texture_source(None, [np.zeros((4, 4, 3), np.uint8)] * 3)
    assert "procedural" in describe_texture_source(None)
    assert "procedural" in AnomalySynthesizer(SIZE).describe_texture_source()


def test_bad_arguments_raise_clear_errors(synth):
    with pytest.raises(ConfigError, match="image_size"):
        AnomalySynthesizer(32)
    with pytest.raises(ConfigError, match="cutpaste_prob"):
        AnomalySynthesizer(SIZE, cutpaste_prob=1.5)
    with pytest.raises(DataError, match="texture_paths is empty"):
        AnomalySynthesizer(SIZE, texture_paths=[])
    with pytest.raises(DataError, match="resize first"):
        synth(smooth_image(SIZE + 1, 0), np.random.default_rng(0))
    with pytest.raises(DataError, match="fallback textures"):
        synth.perlin_texture(smooth_image(SIZE, 0), np.random.default_rng(0), [np.zeros((5, 5), np.uint8)])


def test_perlin_noise_any_shape_reproducible_and_bounded():
    noise = perlin_noise((100, 77), (3, 5), np.random.default_rng(0))
    assert noise.shape == (100, 77) and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1.0 and noise.std() > 0.1
    np.testing.assert_array_equal(noise, perlin_noise((100, 77), (3, 5), np.random.default_rng(0)))
    assert not np.array_equal(noise, perlin_noise((100, 77), (3, 5), np.random.default_rng(1)))
    fractal = fractal_noise((64, 64), 2, 3, np.random.default_rng(0))
    assert fractal.shape == (64, 64) and np.abs(fractal).max() <= 1.0


def test_perlin_mask_follows_threshold_and_is_never_empty(synth):
    fractions = [synth.perlin_mask(np.random.default_rng(seed)).mean() for seed in range(200)]
    assert min(fractions) > 0
    assert np.median(fractions) < 0.2, "thresholding at 0.5 keeps only the noise peaks"
