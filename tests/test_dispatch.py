"""The main process's hand-over of connections to the receiving processes
(``node.network.transport.ConnectionDispatcher``), on real Unix socket pairs: the least busy
receiver takes each connection, and a child receiver takes it when it ties with the main process,
whose interpreter also runs the jobs and the read-ahead (issue 26)."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

from node.network.transport import ConnectionDispatcher, connection_line

ADDRESS = ("127.0.0.1", 40000)


def _handed(dispatcher: ConnectionDispatcher, inbox: socket.socket, open_here: int) -> bool:
    """One new connection offered: ``True`` when the child's inbox got its descriptor."""
    ours, theirs = socket.socketpair()
    try:
        if not dispatcher.hand_over(ours, ADDRESS, open_here):
            return False
        _message, fds, _flags, _address = socket.recv_fds(inbox, 1024, 1)
        for fd in fds:
            os.close(fd)
        return bool(fds)
    finally:
        ours.close()
        theirs.close()


def test_a_child_receiver_takes_each_connection_unless_it_is_busier_than_the_main_process():
    dispatcher = ConnectionDispatcher()
    main_end, inbox = connection_line()
    ended = SimpleNamespace(value=0)  # connections the child has finished
    dispatcher.attach(1, main_end, ended, SimpleNamespace(value=time.monotonic()))
    try:
        for _ in range(3):  # one association at a time: the child, every time
            assert _handed(dispatcher, inbox, open_here=0)
            ended.value += 1
        assert _handed(dispatcher, inbox, open_here=0)  # the child now serves one ...
        assert not _handed(dispatcher, inbox, open_here=0)  # ... so the main process takes the next
        assert _handed(dispatcher, inbox, open_here=1)  # one each: a tie, the child's
        assert not _handed(dispatcher, inbox, open_here=1)  # two against one: the main's
        stale_end, stale_inbox = connection_line()
        dispatcher.attach(1, stale_end, ended, SimpleNamespace(value=time.monotonic() - 60))
        assert not _handed(dispatcher, stale_inbox, open_here=5)  # a silent child gets none, however busy the main
        stale_inbox.close()
    finally:
        dispatcher.close()
        inbox.close()
