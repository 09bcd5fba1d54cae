"""The lock watch: which closes of the xtables lock file are another program's."""
import os
import subprocess
import sys

from profiler.xtlock import LockWatch, XtablesLock


def other_program_opens(path, mode="r"):
    # As an iptables command does: another process opens the file, then closes it on exit.
    subprocess.run([sys.executable, "-c", f"open({path!r}, {mode!r}).close()"], check=True)


def test_generation_moves_for_other_programs_only(tmp_path):
    lock = XtablesLock(path=str(tmp_path / "xtables.lock"))
    with lock.held():
        pass
    watch = LockWatch(lock)
    first = watch.current()                    # not watched before: anything may have happened
    assert watch.current() == first
    for _ in range(3):
        with lock.held():
            assert watch.current() == first    # our own opening and closing is not another program
    assert watch.current() == first
    other_program_opens(lock.path)             # iptables opens it read-only
    with lock.held():
        second = watch.current()
    assert second > first and watch.current() == second
    with lock.held():
        other_program_opens(lock.path, "r+")   # one that opens it read-write, as we do
    assert watch.current() > second
    watch.close()


def test_a_removed_lock_file_is_watched_again_and_moves_the_generation(tmp_path):
    lock = XtablesLock(path=str(tmp_path / "xtables.lock"))
    with lock.held():
        pass
    watch = LockWatch(lock)
    first = watch.current()
    os.unlink(lock.path)
    second = watch.current()
    assert second > first
    with lock.held():                          # made again
        third = watch.current()
    assert third > second                      # the new file was not watched until now
    with lock.held():
        assert watch.current() == third
    other_program_opens(lock.path)
    assert watch.current() > third
    watch.close()


def test_the_lock_excludes_another_holder_and_follows_a_replaced_file(tmp_path):
    import fcntl
    import pytest
    from profiler.errors import FirewallError
    path = str(tmp_path / "xtables.lock")
    lock = XtablesLock(path=path, timeout=0.05)
    with lock.held():
        pass
    other = os.open(path, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)          # another program holds it
    with pytest.raises(FirewallError, match="another program holds it"):
        with lock.held():
            pass
    os.close(other)
    os.unlink(path)                            # replaced: our old descriptor locks nothing
    other = os.open(path, os.O_RDONLY | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    with pytest.raises(FirewallError):
        with lock.held():
            pass
    fcntl.flock(other, fcntl.LOCK_UN)
    with lock.held():
        with pytest.raises(BlockingIOError):   # while we hold it, the new file is locked
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    lock.close()


def test_threads_take_turns_and_a_nested_hold_keeps_the_file_locked(tmp_path):
    import fcntl
    import threading
    import time
    import pytest
    lock = XtablesLock(path=str(tmp_path / "xtables.lock"))
    inside, overlap = [], []

    def work():
        with lock.held():
            overlap.append(len(inside))
            inside.append(1)
            time.sleep(0.01)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [0, 0, 0, 0]
    other = os.open(lock.path, os.O_RDONLY)
    with lock.held():
        with lock.held():
            pass
        with pytest.raises(BlockingIOError):   # the inner one did not release the file lock
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(other)
    lock.close()
