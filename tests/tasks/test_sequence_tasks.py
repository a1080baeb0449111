"""What the sequence tasks share: the run order from needs/provides, the protocol check."""

import types

import pytest

from navit_seq.tasks import sequence


def unit(name, needs=(), provides=()):
    return types.SimpleNamespace(name=name, needs=needs, provides=provides)


def test_tasks_run_after_the_tasks_providing_what_they_need():
    masks, boxes, caption = (
        unit("masks", needs=("boxes",)),
        unit("boxes", provides=("boxes",)),
        unit("caption"),
    )
    order = sequence.run_order([masks, caption, boxes], given=())
    assert [t.name for t in order] == ["caption", "boxes", "masks"]


def test_a_provider_the_ground_truth_replaces_is_left_out():
    masks, boxes = unit("masks", needs=("boxes",)), unit("boxes", provides=("boxes",))
    assert sequence.run_order([boxes, masks], given=("boxes",)) == [masks]


def test_a_need_no_task_provides_is_one_error_naming_the_fix():
    with pytest.raises(ValueError, match=r"need \['boxes'\].*evaluation.use_gt_boxes=True"):
        sequence.run_order([unit("masks", needs=("boxes",))], given=())


def test_every_built_in_sequence_task_implements_the_whole_protocol(scenes_data_dir):
    import ml_collections

    from navit_seq import tasks

    for name in ("detection", "segmentation", "keypoints", "captioning"):
        config = ml_collections.ConfigDict(
            {"name": name, "dataset": "scenes", "data_dir": scenes_data_dir, "seq_len": 48}
        )
        assert isinstance(tasks.get_task(config), sequence.SequenceTask), name
    assert not isinstance(unit("half a task"), sequence.SequenceTask)
