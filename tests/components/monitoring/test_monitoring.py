"""Monitoring: reference profile on the bundled digits, drift tests on held-out and transformed
windows, live accuracy from feedback, bad input (missing/empty/foreign logs, malformed feedback),
the report files, and the stage clock."""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from components.bundle_format import CHECKSUMS_FILE, verify_bundle
from components.config import MonitorParams
from components.monitoring.drift import compare_window, population_stability_index, read_feedback
from components.monitoring.image_stats import (
    IMAGE_STATISTICS,
    PREDICTION_STATISTICS,
    image_statistics,
    prediction_statistics,
)
from components.monitoring.prediction_log import LOG_FILE, PredictionLog, new_record_id, read_prediction_log, utc_now
from components.monitoring.profile import PROFILE_FILE, read_reference_profile
from components.monitoring.report import write_drift_report
from components.monitoring.resources import StageClock
from components.serving.predictor import Predictor
from tests.helpers.digits_bundle import LABELS, digits_bundle, split


@pytest.fixture(scope="module")
def bundle() -> Path:
    return digits_bundle()


@pytest.fixture(scope="module")
def predictor(bundle) -> Predictor:
    return Predictor(bundle)


@pytest.fixture(scope="module")
def profile(bundle):
    return read_reference_profile(bundle)


def write_window(predictor: Predictor, images, folder: Path, sha: str | None = None) -> list[str]:
    """Log one prediction record per image the way the server does; returns the record ids and
    the predicted labels as 'id:label' pairs, in order."""
    log = PredictionLog(folder, 10_000_000, 3)
    probabilities = predictor.probabilities(np.stack([predictor.preprocess_image(image) for image in images]))
    pairs = []
    for image, row in zip(images, probabilities, strict=False):
        record = {
            "event": "prediction",
            "id": new_record_id(),
            "ts": utc_now(),
            "model": "digits",
            "version": "1",
            "model_sha256": sha or predictor.files["model.onnx"],
            "predicted": LABELS[int(np.argmax(row))],
            **prediction_statistics(row),
            **image_statistics(image),
        }
        log.append(record)
        pairs.append(f"{record['id']}:{record['predicted']}")
    log.close()
    return pairs


def compare(folder: Path, profile, predictor, **params):
    return compare_window(folder, profile, MonitorParams(**params), predictor.files["model.onnx"], labels=LABELS)


def drifted(report) -> set[str]:
    return {c.name for c in report.checks if c.drifted}


# --- statistics and profile -----------------------------------------------------------------------


def test_image_statistics_respond_to_the_transforms_they_should():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 20, 1), np.uint8)
    image[:, 8:12] = 255  # a vertical bar over the full height: horizontal differences only
    stats = image_statistics(image)
    assert stats["width"] == 20 and stats["height"] == 40
    assert stats["orientation"] == pytest.approx(1.0)
    assert image_statistics(np.rot90(image))["orientation"] == pytest.approx(0.0)
    assert image_statistics(255 - image)["brightness"] == pytest.approx(1 - stats["brightness"], abs=1e-6)
    noisy = np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    assert image_statistics(noisy)["entropy"] > stats["entropy"] + 2
    big = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    assert image_statistics(big)["width"] == 3000  # size as uploaded, the rest on a <=256 px copy
    p = prediction_statistics(np.array([0.7, 0.2, 0.1]))
    assert p["confidence"] == pytest.approx(0.7) and p["margin"] == pytest.approx(0.5)
    assert prediction_statistics(np.full(4, 0.25))["prediction_entropy"] == pytest.approx(1.0)


def test_reference_profile_from_bundled_digits(bundle, profile, predictor):
    contents = verify_bundle(bundle)  # the profile is listed in SHA256SUMS and verifies
    assert PROFILE_FILE in contents["files"]
    assert profile.model_sha256 == contents["files"]["model.onnx"]
    reference_images, reference_labels = split("reference")
    assert profile.num_images == len(reference_images) == sum(profile.predicted_counts.values())
    assert profile.labels == LABELS and profile.accuracy > 0.9
    assert set(profile.samples) == {*IMAGE_STATISTICS, *PREDICTION_STATISTICS}
    assert all(len(values) == profile.num_images for values in profile.samples.values())
    # the profile's accuracy is the bundle's own accuracy on those images
    predictions = predictor.predict(list(reference_images), top_k=1)
    accuracy = np.mean([p[0]["label"] == str(y) for p, y in zip(predictions, reference_labels, strict=False)])
    assert profile.accuracy == pytest.approx(accuracy)


def test_bundle_without_profile_still_loads(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "old")
    (copy / PROFILE_FILE).unlink()
    sums = copy / CHECKSUMS_FILE
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if not line.endswith(PROFILE_FILE)))
    Predictor(copy)
    assert read_reference_profile(copy) is None


# --- drift ----------------------------------------------------------------------------------------


def test_heldout_digits_show_no_drift(tmp_path, profile, predictor):
    images, _ = split("heldout")
    write_window(predictor, list(images), tmp_path)
    report = compare(tmp_path, profile, predictor)
    assert report.window.predictions == len(images)
    assert all(c.computed for c in report.checks), [c.reason for c in report.checks if not c.computed]
    assert not report.drift_detected, report.triggered
    assert report.check("class_distribution").value < 0.1


def _inverted(images):
    return 255 - images


def _rotated(images):
    return np.stack([np.rot90(image) for image in images])


def _noisy(images):
    noise = np.random.default_rng(1).normal(0, 60, images.shape)
    return np.clip(images.astype(float) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "transform, expected, unaffected",
    [
        (_inverted, {"ks:brightness", "class_distribution"}, {"ks:contrast", "ks:orientation"}),
        (_rotated, {"ks:orientation", "class_distribution"}, {"ks:brightness", "ks:contrast", "ks:entropy"}),
        (_noisy, {"ks:entropy", "ks:sharpness", "ks:contrast"}, {"ks:width", "ks:height"}),
    ],
    ids=["inverted", "rotated90", "heavy-noise"],
)
def test_transformed_images_drift_on_the_right_statistics(
    tmp_path, profile, predictor, transform, expected, unaffected
):
    images, _ = split("heldout")
    write_window(predictor, list(transform(images)), tmp_path)
    report = compare(tmp_path, profile, predictor)
    assert report.drift_detected
    assert expected <= drifted(report), report.triggered
    assert not unaffected & drifted(report), report.triggered


def test_another_class_mix_drifts_on_the_class_distribution(tmp_path, profile, predictor):
    images, labels = split("heldout")
    mix = images[np.isin(labels, [0, 1, 7])]
    write_window(predictor, list(mix), tmp_path)
    report = compare(tmp_path, profile, predictor)
    check = report.check("class_distribution")
    assert check.drifted and check.value > 1 and check.details["chi2_p_value"] < 1e-6
    assert not {"ks:brightness", "confidence_drop", "ks:confidence"} & drifted(report)


def test_drift_is_flagged_exactly_when_a_threshold_is_crossed(tmp_path, profile, predictor):
    images, labels = split("heldout")
    write_window(predictor, list(images[np.isin(labels, [0, 1, 2, 3, 4, 5, 6])]), tmp_path)
    base = {"ks_min_statistic": 1.0, "confidence_drop": 1.0}  # only the class test can fire
    psi = compare(tmp_path, profile, predictor, psi_threshold=10, **base).check("class_distribution").value
    above = compare(tmp_path, profile, predictor, psi_threshold=psi * 1.001, **base)
    below = compare(tmp_path, profile, predictor, psi_threshold=psi * 0.999, **base)
    assert not above.drift_detected and above.triggered == []
    assert below.drift_detected and below.triggered == ["class_distribution"]
    # a KS test needs both the p-value and the distance: a distance above the statistic is not drift
    report = compare(
        tmp_path, profile, predictor, psi_threshold=10, ks_min_statistic=0.0, ks_pvalue=1e-300, confidence_drop=1.0
    )
    assert not report.drift_detected


def test_population_stability_index():
    assert population_stability_index({"a": 50, "b": 50}, {"a": 50, "b": 50}, ["a", "b"]) == pytest.approx(0.0)
    expected = (0.9 - 0.5) * np.log(0.9 / 0.5) + (0.1 - 0.5) * np.log(0.1 / 0.5)
    assert population_stability_index({"a": 5, "b": 5}, {"a": 9, "b": 1}, ["a", "b"]) == pytest.approx(expected)
    assert np.isfinite(population_stability_index({"a": 10, "b": 0}, {"a": 0, "b": 10}, ["a", "b"]))


# --- feedback -------------------------------------------------------------------------------------


def test_feedback_labels_give_the_live_accuracy(tmp_path, profile, predictor):
    images, labels = split("heldout")
    pairs = write_window(predictor, list(images), tmp_path / "log")
    ids = [p.split(":")[0] for p in pairs]
    predicted = [p.split(":")[1] for p in pairs]
    truth = [str(y) for y in labels]
    rows = ["id,label"] + [f"{i},{t}" for i, t in zip(ids[:200], truth[:200], strict=False)]
    rows += [
        "only-one-column",  # wrong column count
        f"{ids[200]},",  # empty label
        f"{ids[201]},cat",  # unknown label
        f"{ids[202]},1",
        f"{ids[202]},2",  # same id again with another label: both dropped
        "not-a-logged-id,3",  # valid row, joins nothing
        f"{ids[203]},4,extra",  # too many columns
    ]
    feedback = tmp_path / "feedback.csv"
    feedback.write_text("\n".join(rows) + "\n")
    report = compare_window(
        tmp_path / "log", profile, MonitorParams(), predictor.files["model.onnx"], feedback, labels=LABELS
    )
    expected = np.mean([p == t for p, t in zip(predicted[:200], truth[:200], strict=False)])
    assert report.feedback.matched == 200 and report.feedback.unmatched == 1
    assert report.metrics()["live/accuracy"] == pytest.approx(expected)
    check = report.check("live_accuracy")
    assert check.computed and check.value == pytest.approx(profile.accuracy - expected) and not check.drifted
    problems = "\n".join(report.feedback.problems)
    for text in (
        "line 202: expected 2 columns",
        "line 203: empty id or label",
        "line 204: unknown label 'cat'",
        "line 206: id",
        "line 208: expected 2 columns",
    ):
        assert text in problems
    assert report.feedback.skipped == 5 and any("feedback: 5 of" in n for n in report.notes)


def test_wrong_feedback_drifts_on_accuracy_only_with_enough_rows(tmp_path, profile, predictor):
    images, _ = split("heldout")
    pairs = write_window(predictor, list(images), tmp_path / "log")
    wrong = [f"{p.split(':')[0]},{(int(p.split(':')[1]) + 1) % 10}" for p in pairs]  # every label wrong
    few, many = tmp_path / "few.csv", tmp_path / "many.csv"
    few.write_text("\n".join(wrong[:10]))
    many.write_text("\n".join(wrong))
    sha = predictor.files["model.onnx"]
    undecided = compare_window(tmp_path / "log", profile, MonitorParams(), sha, few, labels=LABELS)
    assert undecided.check("live_accuracy").computed and not undecided.check("live_accuracy").drifted
    assert "min_feedback" in undecided.check("live_accuracy").reason
    decided = compare_window(tmp_path / "log", profile, MonitorParams(), sha, many, labels=LABELS)
    assert decided.metrics()["live/accuracy"] == 0.0 and decided.triggered == ["live_accuracy"]


def test_unreadable_feedback_is_reported(tmp_path):
    labels, summary = read_feedback(tmp_path / "missing.csv", LABELS)
    assert labels == {} and "not found" in summary.problems[0]
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    labels, summary = read_feedback(binary, LABELS)
    assert labels == {} and "unreadable" in summary.problems[0]


# --- bad input ------------------------------------------------------------------------------------


def _not_computed_reasons(report) -> set[str]:
    return {c.reason for c in report.checks if not c.computed}


def test_missing_and_empty_log_windows_are_reported_not_raised(tmp_path, profile, predictor):
    missing = compare(tmp_path / "nope", profile, predictor)
    assert not missing.drift_detected and missing.window.predictions == 0
    assert any("no prediction log folder" in n for n in missing.notes)
    assert all(not c.computed for c in missing.checks)
    (tmp_path / "empty").mkdir()
    empty = compare(tmp_path / "empty", profile, predictor)
    assert any("no prediction log files" in n for n in empty.notes)
    assert _not_computed_reasons(empty) == {"the log window holds no predictions of this model"}
    files = write_drift_report(empty, tmp_path / "report")  # a report without plots still renders
    assert "Not computed" in Path(files.markdown_path).read_text() and files.plots == []
    images, _ = split("heldout")
    write_window(predictor, list(images[:20]), tmp_path / "small")
    small = compare(tmp_path / "small", profile, predictor)
    assert _not_computed_reasons(small) == {"the log window holds 20 predictions, fewer than min_records 100"}


def test_log_of_another_model_is_left_out(tmp_path, profile, predictor):
    images, _ = split("heldout")
    write_window(predictor, list(images), tmp_path, sha="f" * 64)
    report = compare(tmp_path, profile, predictor)
    assert report.window.excluded_other_model == len(images) and report.window.predictions == 0
    assert any("another model than the reference" in n and "digits v1" in n for n in report.notes)
    assert not report.drift_detected and all(not c.computed for c in report.checks)


def test_malformed_log_lines_and_old_records_are_skipped(tmp_path, profile, predictor):
    images, _ = split("heldout")
    write_window(predictor, list(images[:150]), tmp_path)
    with open(tmp_path / LOG_FILE, "a") as handle:
        handle.write('not json\n[1,2]\n{"no": "ts"}\n')
        old = {
            "event": "prediction",
            "id": "old",
            "ts": (datetime.now(UTC) - timedelta(days=3)).isoformat(),
            "model_sha256": predictor.files["model.onnx"],
            "predicted": "1",
            "confidence": 0.1,
        }
        handle.write(json.dumps(old) + "\n")
    report = compare(tmp_path, profile, predictor, window_hours=24)
    assert report.window.malformed_lines == 3 and report.window.predictions == 150
    assert any("3 malformed log lines" in n for n in report.notes)
    assert compare(tmp_path, profile, predictor).window.predictions == 151


def test_bundle_without_profile_reports_what_it_cannot_compute(tmp_path, predictor):
    images, _ = split("heldout")
    write_window(predictor, list(images), tmp_path)
    report = compare_window(
        tmp_path, None, MonitorParams(), predictor.files["model.onnx"], labels=LABELS, reference_accuracy=0.9
    )
    assert report.window.predictions == len(images) and not report.drift_detected
    assert all(not c.computed and "no usable reference profile" in c.reason for c in report.checks)


def test_report_files(tmp_path, profile, predictor):
    write_window(predictor, list(_inverted(split("heldout")[0])), tmp_path / "log")
    report = compare(tmp_path / "log", profile, predictor)
    files = write_drift_report(report, tmp_path / "out")
    markdown = Path(files.markdown_path).read_text()
    assert "**drift detected**" in markdown and "| ks:brightness | DRIFT |" in markdown
    assert "![class_distribution](class_distribution.png)" in markdown
    assert sorted(Path(p).name for p in files.plots) == ["class_distribution.png", "statistics.png"]
    html = Path(files.html_path).read_text()
    assert html.count("data:image/png;base64,") == 2 and "drift detected" in html
    saved = json.loads(Path(files.json_path).read_text())
    assert saved["drift_detected"] is True and "ks:brightness" in saved["triggered"]


# --- prediction log and stage clock ----------------------------------------------------------------


def test_prediction_log_rotates_within_its_bound(tmp_path):
    log = PredictionLog(tmp_path, max_bytes=2_000, max_files=3)
    for index in range(500):
        log.append({"event": "prediction", "id": str(index), "ts": utc_now(), "predicted": "1"})
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == [LOG_FILE, f"{LOG_FILE}.1", f"{LOG_FILE}.2"]
    assert all(p.stat().st_size < 2_000 for p in files)
    records = read_prediction_log(tmp_path).records
    assert records[-1]["id"] == "499" and [int(r["id"]) for r in records] == sorted(int(r["id"]) for r in records)
    with pytest.raises(ValueError):
        PredictionLog(tmp_path, max_bytes=2_000, max_files=1)


def test_stage_clock_reports_time_and_peak_memory():
    stages = []
    clock = StageClock(lambda name, seconds, peak: stages.append((name, seconds, peak)), interval_s=0.05)
    clock.start("small")
    time.sleep(0.1)
    clock.start("big")
    block = np.ones(150 * 1024**2 // 8)  # 150 MB, touched
    time.sleep(0.2)
    del block
    clock.stop()
    clock.stop()
    assert [s[0] for s in stages] == ["small", "big"]
    assert stages[0][1] >= 0.1 and stages[1][1] >= 0.2
    assert stages[1][2] - stages[0][2] > 100
