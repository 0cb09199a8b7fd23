#!/usr/bin/env python3
"""Prints, for each block size given, the first port of a block of that many free loopback ports,
the blocks disjoint: `free_ports.py 1 1 18` -> "P Q B". Ports lie below the kernel's ephemeral
range: a job that runs twice, a minute apart, may otherwise find one of its ports taken in
between by an outgoing connection ("Address already in use": seen once in CI)."""
import random
import socket
import sys


def free(port):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def main(sizes):
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low, 12000) - max(sizes)
    taken = set()
    firsts = []
    for n in sizes:
        while True:
            b = random.randrange(10000, top)
            block = set(range(b, b + n))
            if not block & taken and all(free(p) for p in block):
                break
        taken |= block
        firsts.append(b)
    print(*firsts)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1])
