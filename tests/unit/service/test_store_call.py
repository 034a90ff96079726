"""How the admin endpoints report the task store's refusals: a store that cannot be written is a 503 that says so,
without the store's path."""
import pytest

from prompts_store import StoreWriteFailed, TaskNotFound
from service.errors import ApiError
from service.http.tasks import store_call


def refuse(error: Exception):
    def call():
        raise error
    return call


def test_a_store_that_cannot_be_written_is_a_503_that_says_nothing_changed():
    with pytest.raises(ApiError) as e:
        store_call(refuse(StoreWriteFailed("store /srv/keepclip: cannot delete task 'a': Read-only file system; nothing changed")))
    assert e.value.status_code == 503 and e.value.code == "store_unavailable"
    assert "cannot be written (a full disk, a read-only store?); nothing changed (StoreWriteFailed)" in e.value.message
    assert "/srv/keepclip" not in e.value.message
    with pytest.raises(ApiError) as e:
        store_call(refuse(OSError(5, "Input/output error")))
    assert e.value.status_code == 503 and "cannot be read (OSError)" in e.value.message
    with pytest.raises(ApiError) as e:
        store_call(refuse(TaskNotFound("no task 'a' in store /srv/keepclip", task="a")))
    assert e.value.status_code == 404 and e.value.message == "no task 'a'"
