"""PET in body-weight SUV: ``read_series`` turns a PT series in Bq/ml into SUVbw from its header (the vendors'
and QIBA's formula), passes GML through, refuses naming the attribute when it cannot, and uses the values as
they are with ``pet_units="SUV"``."""

import dataclasses
import shutil
import subprocess

import numpy as np
import pytest

from clients.dicom_io import DicomSeriesError, PetHeader, read_series, write_series
from duplus.synth.phantoms import generate_phantom

DOSE_BQ, HALF_LIFE_S, WEIGHT_KG = 370e6, 6586.2, 75.0          # 370 MBq of F-18, 75 kg: PetHeader()'s defaults


@pytest.fixture(scope="module")
def pet_suv():
    """A 24 x 24 x 6 piece of a head-and-neck PET phantom in SUV (0 .. ~8), with its affine."""
    ph = generate_phantom("head_neck", "PET", 474747)
    return ph.image[10:34, 16:40, 25:31].astype(np.float32), ph.affine


def _write(tmp_path, suv, affine, header: PetHeader, bq_per_ml_factor: float = 1.0):
    folder = tmp_path / "pt"
    write_series(suv * bq_per_ml_factor, affine, folder, modality="PT", body_part="HEADNECK", pet=header)
    return folder


# (case, header, injection-to-reference delay in seconds per slice k)
CASES = [
    ("START: series time 12:00, injected 11:00", PetHeader(), lambda k: 3600.0),
    ("START: series re-created at 13:30, acquired at 12:00: the acquisition time counts",
     PetHeader(series_time="133000", acquisition_times=("120000",) * 6), lambda k: 3600.0),
    ("START: injection as RadiopharmaceuticalStartDateTime",
     PetHeader(injection_time=None, injection_datetime="20261122104500"), lambda k: 4500.0),
    ("START: injected 23:30 the day before a 00:30 scan", PetHeader(injection_time="233000", series_time="003000"),
     lambda k: 3600.0),
    ("ADMIN: decay-corrected to the injection", PetHeader(decay_correction="ADMIN"), lambda k: 0.0),
    ("NONE: each image decays to its own acquisition time (12:00:00 + 30 s per slice)",
     PetHeader(decay_correction="NONE", acquisition_times=tuple(f"12{30 * k // 60:02d}{30 * k % 60:02d}"
                                                                for k in range(6))),
     lambda k: 3600.0 + 30 * k),
]


@pytest.mark.parametrize("case, header, delay", CASES, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(CASES)])
def test_suv_equals_the_hand_computation(pet_suv, tmp_path, case, header, delay):
    suv, affine = pet_suv
    folder = _write(tmp_path, suv, affine, header)
    raw = read_series(folder, pet_units="SUV").volume          # the rescaled values as stored (here "Bq/ml")
    s = read_series(folder)
    assert s.modality == "PT" and s.units == "SUVbw"
    for k in range(suv.shape[2]):
        # SUVbw = Bq/ml * weight [g] / (injected dose [Bq] decayed over the delay with the F-18 half-life)
        decayed_dose = DOSE_BQ * 0.5 ** (delay(k) / HALF_LIFE_S)
        factor = WEIGHT_KG * 1000.0 / decayed_dose
        np.testing.assert_allclose(s.volume[:, :, k], raw[:, :, k] * factor, rtol=1e-4, atol=0, err_msg=case)
    # 60 min after injection: 370 MBq * 2^(-3600 / 6586.2) = 370 MBq * 0.684633 = 253.314 MBq left, so
    # 1 Bq/ml = 75000 g / 253.314e6 Bq = 2.96075e-4 SUV
    if case.startswith("START: series time"):
        assert DOSE_BQ * 0.5 ** (3600 / HALF_LIFE_S) == pytest.approx(253.314e6, rel=1e-5)
        assert s.volume.max() / raw.max() == pytest.approx(2.96075e-4, rel=1e-4)


def test_bq_per_ml_series_reads_back_as_the_suv_it_was_made_from(pet_suv, tmp_path):
    suv, affine = pet_suv
    decayed_dose = DOSE_BQ * 0.5 ** (3600 / HALF_LIFE_S)
    s = read_series(_write(tmp_path, suv, affine, PetHeader(), decayed_dose / (WEIGHT_KG * 1000.0)))
    # 16-bit storage of 0 .. 8 SUV: one level is 8 / 32767 = 2.4e-4 SUV
    np.testing.assert_allclose(s.volume, suv, atol=2.5e-4)
    assert 3 < s.volume.max() < 20                             # SUVmax of a tumour, not Bq/ml
    if shutil.which("dciodvfy"):                               # the PT images write_series makes are valid
        check = subprocess.run(["dciodvfy", str(s.datasets[0].filename)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_gml_is_already_suv(pet_suv, tmp_path):
    suv, affine = pet_suv
    s = read_series(_write(tmp_path, suv, affine, PetHeader(units="GML", patient_weight_kg=None,
                                                            radiopharmaceutical_sequence=False)))
    assert s.units == "SUVbw"
    np.testing.assert_allclose(s.volume, suv, atol=2.5e-4)


@pytest.mark.parametrize("change, message", [
    ({"patient_weight_kg": None}, "PatientWeight is missing"),
    ({"patient_weight_kg": 0.0}, "PatientWeight 0 is not positive"),
    ({"injected_dose_bq": None}, "RadionuclideTotalDose is missing"),
    ({"half_life_s": None}, "RadionuclideHalfLife is missing"),
    ({"injection_time": None}, "RadiopharmaceuticalStartTime is missing"),
    ({"radiopharmaceutical_sequence": False}, "RadiopharmaceuticalInformationSequence is missing"),
    ({"units": None}, "Units is missing"),
    ({"units": "CNTS"}, "Units CNTS is not BQML or GML"),
    ({"decay_correction": None}, "DecayCorrection is missing"),
    ({"series_time": None}, "SeriesTime and AcquisitionTime are missing"),
    ({"injection_time": "130000", "injection_datetime": "20261122130000"}, "is after the scan"),
], ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None)
def test_missing_or_invalid_attribute_is_named_and_pet_units_suv_bypasses(pet_suv, tmp_path, change, message):
    suv, affine = pet_suv
    folder = _write(tmp_path, suv, affine, dataclasses.replace(PetHeader(), **change))
    with pytest.raises(DicomSeriesError, match=message) as err:
        read_series(folder)
    assert "pet_units='SUV' (CLI: --pet-units SUV)" in str(err.value)
    s = read_series(folder, pet_units="SUV")                   # the user says the values already are SUV
    assert s.units == "SUVbw"
    np.testing.assert_allclose(s.volume, suv, atol=2.5e-4)


def test_other_pet_units_are_refused(pet_suv, tmp_path):
    suv, affine = pet_suv
    folder = _write(tmp_path, suv, affine, PetHeader())
    with pytest.raises(ValueError, match="pet_units must be None .* or 'SUV', got 'BQML'"):
        read_series(folder, pet_units="BQML")
