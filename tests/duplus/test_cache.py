import threading

import pytest

from duplus.cache import LRUCache


def test_lru_is_bounded_and_keeps_the_recently_used():
    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1          # a is now the most recent
    c.put("c", 3)                   # evicts b
    assert "b" not in c and c.get("a") == 1 and c.get("c") == 3 and len(c) == 2
    assert (c.hits, c.misses) == (3, 0)
    assert c.get("b") is None and c.misses == 1


def test_get_or_compute_computes_once():
    c, calls = LRUCache(4), []
    for _ in range(3):
        assert c.get_or_compute("k", lambda: calls.append(1) or 42) == 42
    assert calls == [1]


def test_threads_share_one_bounded_cache():
    c = LRUCache(8)

    def work(i):
        for j in range(200):
            c.get_or_compute((i, j % 16), lambda j=j: j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(c) == 8


def test_entries_must_be_positive():
    with pytest.raises(ValueError, match="entries"):
        LRUCache(0)
