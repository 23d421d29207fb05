"""Aspect-ratio buckets and the seeded, resumable batch order of the trainer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training.buckets import BatchOrder, bucket_sizes, fit_faces_to_bucket, fit_to_bucket, image_size, nearest_bucket


def test_buckets_keep_the_pixel_count_and_multiples_of_16():
    for height, width in bucket_sizes(512):
        assert height % 16 == 0 and width % 16 == 0
        assert 0.9 < height * width / 512**2 < 1.1
    assert (512, 512) in bucket_sizes(512)


@pytest.mark.parametrize(("height", "width", "bucket"), [
    (1000, 1000, (512, 512)), (600, 800, (448, 592)), (800, 600, (592, 448)),
    (1080, 1920, (384, 688)), (4000, 1000, (720, 368)),
])
def test_each_target_goes_to_the_nearest_aspect_ratio(height, width, bucket):
    assert nearest_bucket(height, width, bucket_sizes(512)) == bucket


def test_fit_covers_the_bucket_and_crops_the_centre():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, 100:200] = 255  # a white centre third
    fitted = fit_to_bucket(image, (64, 96))
    assert fitted.shape == (64, 96, 3)
    assert fitted[:, 40:56].min() > 0.99 and fitted[:, :8].max() < 0.01  # the centre kept, not squashed


def test_image_size_applies_the_exif_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a 40x20 file shows as 20 wide and 40 high
    Image.new("RGB", (40, 20)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.jpg")
    assert image_size(tmp_path / "rotated.jpg") == (40, 20)
    assert image_size(tmp_path / "plain.jpg") == (20, 40)


KEYS = ["square"] * 5 + ["wide"] * 3 + ["tall"]


def _epoch(order: BatchOrder) -> list[list[int]]:
    return [order.next_batch() for _ in range(order.steps_per_epoch())]


def test_batches_hold_one_shape_and_an_epoch_covers_every_sample_once():
    order = BatchOrder(KEYS, batch_size=2, seed=0)
    batches = _epoch(order)
    assert sorted(i for batch in batches for i in batch) == list(range(len(KEYS)))
    assert all(len({KEYS[i] for i in batch}) == 1 for batch in batches)
    assert max(len(b) for b in batches) == 2
    assert _epoch(order) != batches  # a new order each epoch


def test_the_order_is_seeded_and_resumes_exactly():
    straight = BatchOrder(KEYS, 2, seed=3)
    expected = [straight.next_batch() for _ in range(9)]
    first = BatchOrder(KEYS, 2, seed=3)
    taken = [first.next_batch() for _ in range(4)]
    resumed = BatchOrder(KEYS, 2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert taken + [resumed.next_batch() for _ in range(5)] == expected
    assert [BatchOrder(KEYS, 2, seed=4).next_batch() for _ in range(9)] != expected


def test_processes_share_out_each_epoch():
    single = _epoch(BatchOrder(KEYS, 1, seed=0))
    ranks = [_epoch(BatchOrder(KEYS, 1, seed=0, process_index=r, process_count=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    # Rank 0 takes batches 0, 2, 4, ...; rank 1 takes 1, 3, ... and wraps to batch 0 for its last step.
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2] + [single[0]]


def test_faces_found_on_the_photo_land_where_the_fitted_copy_shows_them(face_model, photos):
    """The data check detects on the full photo; the step uses those faces in the bucket's pixels."""
    from umo_core.images import load_image

    photo = load_image(photos / "t1_six_people.jpg")  # 1280 x 886, six faces
    analysed = face_model.analyse(photo)[0]
    for size, kept in (((416, 624), 6), ((592, 448), 3)):  # its own 3:2 bucket; a portrait one cuts the sides
        fitted = fit_faces_to_bucket(analysed, photo.shape[:2], size)
        assert len(fitted.faces) == len(fitted.embeddings) == kept
        keypoints = fitted.faces.keypoints
        assert (keypoints >= 0).all() and (keypoints[..., 0] < size[1]).all() and (keypoints[..., 1] < size[0]).all()
        copy = (fit_to_bucket(photo, size).numpy() * 255 + 0.5).astype(np.uint8)
        found = face_model.detect(copy)[0].keypoints
        # Each face within the detector's own jitter at this scale of a face detected on the fitted copy.
        nearest = np.abs(found[None] - keypoints[:, None]).max(axis=(2, 3)).min(axis=1)
        assert (nearest < (3 if kept == 6 else 8)).all(), nearest
