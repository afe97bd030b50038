"""A rendezvous port for a launched process group: one the OS reports free now. A random
guess is no better than a fixed one here: every test module that trains in-process first
seeds Python's ``random`` with the run's seed, so the "random" ports collide across tests
and with any concurrent run of the suite."""

import socket


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
