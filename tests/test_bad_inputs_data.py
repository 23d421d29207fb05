"""prepare_data's settings: every value checked once, before any file or model is opened, with one line naming the
flag; the help shows every default. No photo is read here: the photos folder and the face pack do not even exist."""

from __future__ import annotations

import dataclasses

import pytest

from training.prepare_data import PrepareSettings, main, parse_args, settings_from


def _run(tmp_path, *extra: str) -> list[str]:
    return ["--photos", str(tmp_path / "no_photos"), "--out", str(tmp_path / "out"), "--faces",
            str(tmp_path / "no_pack"), *extra]


@pytest.mark.parametrize(("extra", "message"), [
    (["--cluster-threshold", "5"], "--cluster-threshold 5 is out of range: give a value above 0 and below 1 (a cosine "
                                   "distance"),
    (["--cluster-threshold", "0"], "--cluster-threshold 0 is out of range"),
    (["--cluster-threshold", "nan"], "--cluster-threshold nan is out of range"),
    (["--match-threshold", "-0.2"], "--match-threshold -0.2 is out of range: give a value above 0 and below 1"),
    (["--match-threshold", "1.5"], "--match-threshold 1.5 is out of range"),
    (["--reference-margin", "-0.9"], "--reference-margin -0.9 is out of range: give a value at least 0 and at most 3"),
    (["--reference-margin", "10"], "--reference-margin 10 is out of range"),
    (["--min-score", "2"], "--min-score 2 is out of range: give a value at least 0 and at most 1"),
    (["--min-face-size", "-1"], "--min-face-size -1 is out of range: give a value at least 0"),
    (["--min-sharpness", "-5"], "--min-sharpness -5 is out of range"),
    (["--border-margin", "3"], "--border-margin 3 is out of range: give a value at least -inf and at most 1"),
    (["--duplicate-bits", "40"], "--duplicate-bits 40 is out of range: give at most 16"),
    (["--eval-fraction", "1"], "--eval-fraction 1 is out of range: give a value at least 0 and below 1"),
    (["--eval-fraction", "-0.1"], "--eval-fraction -0.1 is out of range"),
    (["--min-people", "3", "--max-people", "2"], "--min-people 3 and --max-people 2: need 1 <= min <= max"),
    (["--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["--workers", "0"], "--workers 0 must be at least 1"),
    (["--max-pixels", "-5"], "--max-pixels is -5; give a positive number of pixels"),
    (["--prompt-template", "a photo of {who}"], "--prompt-template 'a photo of {who}' is not usable"),
    (["--shard", "2/2"], "--shard '2/2': K must be 0 to N-1"),
])
def test_a_value_out_of_range_is_one_line_naming_the_flag_before_anything_is_opened(tmp_path, capsys, extra,
                                                                                       message):
    assert main(_run(tmp_path, *extra)) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and len(error.splitlines()) == 1, error
    assert list(tmp_path.iterdir()) == []  # nothing written, not even --out


def test_a_bad_pixel_limit_in_the_environment_is_named_before_anything_is_opened(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UMO_MAX_PIXELS", "abc")
    assert main(_run(tmp_path)) == 2
    assert capsys.readouterr().err == ("error: $UMO_MAX_PIXELS is 'abc'; set it to a whole number of pixels (0 for "
                                       "no limit) or unset it\n")
    assert list(tmp_path.iterdir()) == []


def test_the_settings_are_one_frozen_object_with_the_derived_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("UMO_MAX_PIXELS", raising=False)
    settings = settings_from(parse_args(_run(tmp_path, "--shard", "1/4", "--max-pixels", "0")))
    assert isinstance(settings, PrepareSettings)
    assert settings.cache == tmp_path / "out" / ".face-cache" and settings.eval_out == tmp_path / "out-eval"
    assert settings.shard == (1, 4) and settings.max_pixels == 0
    assert settings.filters.border_margin == settings.border_margin
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.cluster_threshold = 5  # type: ignore[misc]
    assert settings.report()["out"] == str(tmp_path / "out")


def test_every_option_shows_its_default(capsys, monkeypatch):
    monkeypatch.delenv("UMO_FACE_PACK", raising=False)
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("--cluster-threshold CLUSTER_THRESHOLD clustering: cosine distance (1 - similarity) where "
                    "average-linkage groups stop merging (0 to 1) (default: 0.6)",
                    "(default: 0.4)", "(default: 64)", "(default: 0.05)", "(default: 6)", "(default: a photo of "
                    "{people})", "(default: 16)", "(default: 0.0)", "(default: antelopev2)"):
        assert default in text, default
