"""The int8 KV cache's calibration math (engine/kv_int8.py) and its variable."""

from __future__ import annotations

import numpy as np
import pytest

from ortserve.config import Settings, SettingsError
from ortserve.engine.kv_int8 import channel_scales


def test_each_channel_takes_its_largest_magnitude_times_the_margin():
    values = np.zeros((2, 3, 4), np.float32)  # [kv_heads, tokens, head_size]
    values[0, 1] = [1.0, -2.0, 0.5, 4.0]
    values[1, 2] = [-3.0, 1.0, 2.0, 1.0]
    keys = values.copy()
    k, v = channel_scales(keys, values, rotary=None, margin=2.0)
    expected = np.array([1, 2, 0.5, 4, 3, 1, 2, 1], np.float32) * 2.0 / 127
    np.testing.assert_allclose(v, expected, rtol=1e-6)
    np.testing.assert_allclose(k, expected, rtol=1e-6)
    assert k.dtype == v.dtype == np.float32


def test_a_rotated_key_pair_takes_the_pairs_largest_length():
    """Rotary turns channels (i, i + half) together: at other positions channel i + half may
    hold all of the pair's length, so both are scaled for it."""
    keys = np.zeros((1, 2, 4), np.float32)
    keys[0, 0] = [3.0, 0.0, 4.0, 0.0]  # pair (0, 2) has length 5; pair (1, 3) is unrotated 0
    keys[0, 1] = [0.0, 1.0, 0.0, 0.0]
    k, _ = channel_scales(keys, keys, rotary=(2, False), margin=1.0)
    np.testing.assert_allclose(k * 127, [5, 1, 5, 1], rtol=1e-6)
    k, _ = channel_scales(keys, keys, rotary=(2, True), margin=1.0)  # pairs (0, 1), (2, 3)
    np.testing.assert_allclose(k * 127, [3, 3, 4, 4], rtol=1e-6)


def test_a_channel_left_near_zero_keeps_a_floor():
    values = np.zeros((1, 2, 2), np.float32)
    values[0, 0, 0] = 10.0
    _, v = channel_scales(values, values, rotary=None, margin=1.0)
    np.testing.assert_allclose(v * 127, [10.0, 0.1], rtol=1e-6)
    _, v = channel_scales(values * 0, values * 0, rotary=None, margin=1.0)
    assert np.all(v > 0)  # an all-zero layer still divides by something


def test_the_variable_takes_f32_or_q8():
    assert Settings.from_env({}).kv_cache_type == "f32"
    assert Settings.from_env({"ORTSERVE_KV_CACHE_TYPE": " Q8 "}).kv_cache_type == "q8"
    with pytest.raises(SettingsError, match="ORTSERVE_KV_CACHE_TYPE must be f32 or q8"):
        Settings.from_env({"ORTSERVE_KV_CACHE_TYPE": "q4"})


def test_only_cpu_models_asking_for_q8_get_a_scales_folder(tmp_path):
    from ortserve.engine.og_backend import _kv_cache_folder
    from ortserve.library.store import ModelInfo

    info = ModelInfo("m:latest", tmp_path / "bundles" / "sha256-ab", {})
    q8 = Settings(models=tmp_path, kv_cache_type="q8")
    assert _kv_cache_folder(info, "cpu", q8) == tmp_path / "cache" / "kv_int8" / "sha256-ab"
    assert _kv_cache_folder(info, "cuda", q8) is None
    assert _kv_cache_folder(info, "cpu", Settings(models=tmp_path)) is None
