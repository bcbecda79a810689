import numpy as np
import pytest
import torch

import gradbook as gb


def test_digits_ships_with_scikit_learn_and_splits_reproducibly():
    task = gb.data.digits()
    assert task.in_dim == 64 and task.out_dim == 10 and task.kind == "classification"
    assert len(task.x_train) + len(task.x_test) == 1797
    torch.testing.assert_close(task.x_test, gb.data.digits().x_test)
    # standardized on the training set
    assert np.allclose(task.x_train.mean(0).numpy(), 0, atol=1e-5)
    sd = task.x_train.std(0, unbiased=False).numpy()
    assert np.all((np.abs(sd - 1) < 1e-4) | (sd == 0))
    unit = gb.data.digits(scale="unit")
    assert unit.x_train.min() >= 0 and unit.x_train.max() <= 1


def test_batches_come_from_the_training_set_and_follow_the_generator():
    task = gb.data.digits()
    x1, y1 = task.batch(32, torch.Generator().manual_seed(5))
    x2, y2 = task.batch(32, torch.Generator().manual_seed(5))
    torch.testing.assert_close(x1, x2)
    assert x1.shape == (32, 64) and y1.dtype == torch.long


def test_teacher_task_is_deterministic_and_order_one():
    a, b = gb.data.teacher(seed=3), gb.data.teacher(seed=3)
    torch.testing.assert_close(a.y_train, b.y_train)
    assert a.kind == "regression" and a.out_dim == 1
    assert 0.05 < a.y_train.var().item() < 5


def test_task_to_casts_inputs_but_not_labels():
    task = gb.data.digits().to(dtype=torch.float64)
    assert task.x_train.dtype == torch.float64 and task.y_train.dtype == torch.long


def test_bad_arguments():
    with pytest.raises(ValueError, match="'minmax'"):
        gb.data.digits(scale="minmax")
    with pytest.raises(ValueError, match="test_fraction"):
        gb.data.digits(test_fraction=1.5)
    with pytest.raises(ValueError, match="width"):
        gb.data.teacher(width=0)


def test_adding_problem_marks_one_value_in_each_half():
    task = gb.data.adding_problem(length=10, n_train=500, n_test=100)
    x, y = task.x_train, task.y_train
    assert x.shape == (500, 10, 2) and y.shape == (500, 1) and task.in_dim == 2
    marks = x[..., 1]
    assert torch.all(marks.sum(1) == 2)
    assert torch.all(marks[:, :5].sum(1) == 1) and torch.all(marks[:, 5:].sum(1) == 1)
    torch.testing.assert_close(y[:, 0], (x[..., 0] * marks).sum(1))
    baseline = ((y - 1.0) ** 2).mean().item()            # predicting the mean: Var(u1 + u2) = 1/6
    assert abs(baseline - 1 / 6) < 0.03
    with pytest.raises(ValueError, match="length"):
        gb.data.adding_problem(length=1)


@pytest.mark.parametrize("kind", gb.data.SEQUENCES)
def test_sequence_tasks_are_next_token_prediction(kind):
    task = gb.data.sequences(kind, length=24, vocab=20, period=6, n_train=64, n_test=16, seed=1)
    assert task.kind == "language" and task.x_train.shape == (64, 24) and task.x_test.shape == (16, 24)
    assert task.x_train.dtype == torch.long and task.y_train.dtype == torch.long
    torch.testing.assert_close(task.x_train[:, 1:], task.y_train[:, :-1])      # targets: one step later
    assert 0 <= task.x_train.min() and task.x_train.max() < task.vocab and task.out_dim == task.vocab
    torch.testing.assert_close(task.x_train, gb.data.sequences(kind, length=24, vocab=20, period=6, n_train=64,
                                                               n_test=16, seed=1).x_train)
    x, y = task.batch(8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 24)


def test_repeat_copy_sort_follow_their_rule():
    rep = gb.data.sequences("repeat", length=24, vocab=20, period=6, n_train=8, n_test=1)
    torch.testing.assert_close(rep.x_train[:, 6:], rep.x_train[:, :-6])
    copy = gb.data.sequences("copy", length=21, vocab=20, n_train=8, n_test=1)
    src = copy.x_train[:, :10]
    assert (copy.x_train[:, 10] == 0).all() and (src > 0).all()
    torch.testing.assert_close(copy.y_train[:, 10:20], src)
    srt = gb.data.sequences("sort", length=21, vocab=20, n_train=8, n_test=1)
    torch.testing.assert_close(srt.y_train[:, 10:20], srt.x_train[:, :10].sort(1).values)
    chars = gb.data.sequences("chars", length=32, n_train=8, n_test=1)
    assert chars.vocab > 40


def test_sequences_reject_unknown_kinds():
    with pytest.raises(ValueError, match=r"kind 'zip'.*'repeat'"):
        gb.data.sequences("zip")
    with pytest.raises(ValueError, match="length"):
        gb.data.sequences("repeat", length=0)
