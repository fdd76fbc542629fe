"""converters/image_attention.py's masks, evaluated by onnxruntime against the rule written out
in numpy: causal (within the window on local layers), or both tokens of the same picture in
this step; keys the attention mask hides never attend."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from converters import image_attention

IMAGE = 9


def masks(input_ids: np.ndarray, attention_mask: np.ndarray, window: int) -> tuple:
    p = image_attention._PREFIX
    graph = helper.make_graph(
        image_attention._mask_nodes(IMAGE, window),
        "masks",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
        ],
        [
            helper.make_tensor_value_info(f"{p}/global_mask", TensorProto.BOOL, None),
            helper.make_tensor_value_info(f"{p}/local_mask", TensorProto.BOOL, None),
        ],
    )
    ordered = image_attention._in_order(list(graph.node), graph)
    del graph.node[:]
    graph.node.extend(ordered)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})


def expected(input_ids, attention_mask, window: int | None) -> np.ndarray:
    step, total = input_ids.shape[1], attention_mask.shape[1]
    past = total - step
    picture = np.zeros(total, dtype=int)  # 0: text; runs of image tokens numbered in the step
    run = 0
    for i, token in enumerate(input_ids[0]):
        if token == IMAGE:
            run += i == 0 or input_ids[0, i - 1] != IMAGE
            picture[past + i] = run
    allowed = np.zeros((step, total), dtype=bool)
    for q in range(step):
        for k in range(total):
            causal = k <= past + q and (window is None or past + q - k < window)
            same = picture[past + q] > 0 and picture[past + q] == picture[k]
            allowed[q, k] = (causal or same) and attention_mask[0, k] == 1
    return allowed[None, None]


@pytest.mark.parametrize("past", [0, 3])
def test_pictures_attend_both_ways_and_text_causally(past):
    ids = np.array([[1, 2, IMAGE, IMAGE, IMAGE, 4, IMAGE, IMAGE, 5, 6]], dtype=np.int64)
    attention = np.ones((1, past + ids.shape[1]), dtype=np.int64)
    got_global, got_local = masks(ids, attention, window=4)
    np.testing.assert_array_equal(got_global, expected(ids, attention, None))
    np.testing.assert_array_equal(got_local, expected(ids, attention, 4))
    # the two pictures are apart: the first's last token does not see the second's
    assert not got_global[0, 0, 4, past + 6] and got_global[0, 0, 2, past + 4]


def test_hidden_keys_never_attend_and_a_decode_step_sees_its_past():
    ids = np.array([[IMAGE]], dtype=np.int64)  # one new token after 5 (the first one padding)
    attention = np.array([[0, 1, 1, 1, 1, 1]], dtype=np.int64)
    got_global, got_local = masks(ids, attention, window=3)
    np.testing.assert_array_equal(got_global, expected(ids, attention, None))
    np.testing.assert_array_equal(got_global[0, 0, 0], [False, True, True, True, True, True])
    np.testing.assert_array_equal(got_local[0, 0, 0], [False, False, False, True, True, True])


def test_a_decoder_without_group_query_attention_is_refused(tmp_path):
    graph = helper.make_graph([], "empty", [], [])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="no GroupQueryAttention"):
        image_attention.rewrite(path, IMAGE, None)
