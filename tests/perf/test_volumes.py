"""One table of benchmark volumes for every perf tool: the CLIs offer its names, the locust cases and the
perf_analyzer patch are drawn from it."""

import numpy as np
import pytest

from perf import bench, load
from perf.volumes import TARGETS, VOLUMES, make_volume, phantom_patch, t1_prompt


@pytest.mark.parametrize("cli", [bench, load], ids=["perf.bench", "perf.load"])
def test_the_volume_options_are_the_table(cli, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--volumes", "mri_brain"])
    err = capsys.readouterr().err
    assert "invalid choice: 'mri_brain'" in err
    assert all(repr(name) in err for name in VOLUMES)


def test_locust_cases_are_the_table_volumes(tmp_path):
    path = load.write_cases(["small_ct_head_neck"], tmp_path / "cases.npz")
    ph = make_volume("small_ct_head_neck")
    np.testing.assert_allclose(ph.spacing, 3.0)
    with np.load(path) as z:
        assert int(z["count"]) == 1 and str(z["name_0"]) == "small_ct_head_neck"
        np.testing.assert_array_equal(z["volume_0"], ph.image)
        np.testing.assert_array_equal(z["affine_0"], ph.affine)
        assert str(z["modality_0"]) == "CT" and list(z["targets_0"]) == TARGETS["head_neck"]
        assert t1_prompt("small_ct_head_neck") in list(z["t1_0"])
        assert "GTVp" in list(z["syn_0_0"])


def test_phantom_patch_is_a_real_model_space_patch():
    patch = phantom_patch("ct_abdomen", (96, 96, 64), around="liver")
    assert patch.shape == (1, 1, 96, 96, 64) and patch.dtype == np.float32
    assert np.isfinite(patch).all() and patch.std() > 0.05   # a phantom, not zeros, a constant or noise we made up
    patch[:] = 0
    assert phantom_patch("ct_abdomen", (96, 96, 64), around="liver").std() > 0.05   # callers get their own copy
