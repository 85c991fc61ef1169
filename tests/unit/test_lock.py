import os

import pytest

from distill.lock import LockedError, run_lock


def test_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    lock = tmp_path / "distill.lock"
    with run_lock(lock):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"), run_lock(lock):
            pass
    assert not lock.exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / "distill.lock"
    lock.write_text("999999999")  # no such process
    with run_lock(lock):
        assert lock.read_text() == str(os.getpid())
