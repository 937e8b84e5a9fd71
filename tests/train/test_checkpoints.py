from em_core.models.adapters import step_of
from em_core.train.checkpoints import checkpoint_schedule


def test_four_in_first_epoch_then_one_per_epoch():
    # 100 steps per epoch, 3 epochs: 25/50/75/100 inside epoch 1, then 200 and 300.
    assert checkpoint_schedule(300, 100, in_first_epoch=4) == [25, 50, 75, 100, 200, 300]


def test_uneven_epoch_rounds_up_and_keeps_final_step():
    assert checkpoint_schedule(23, 10, in_first_epoch=3) == [4, 7, 10, 20, 23]


def test_explicit_steps_replace_schedule_and_drop_out_of_range():
    assert checkpoint_schedule(50, 10, explicit=[1, 5, 80]) == [1, 5, 50]


def test_no_epoch_saves_when_disabled():
    assert checkpoint_schedule(40, 10, in_first_epoch=2, every_epoch=False) == [5, 10, 40]


def test_short_run_and_empty():
    assert checkpoint_schedule(2, 100, in_first_epoch=4) == [1, 2]
    assert checkpoint_schedule(0, 10) == []


def test_step_of_parses_checkpoint_folders():
    assert step_of("checkpoints/checkpoint-120") == 120
    assert step_of("checkpoints/checkpoint-7/") == 7
    assert step_of("checkpoints/other") is None
