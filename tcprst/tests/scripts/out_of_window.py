#!/usr/bin/env python3
"""Sends one TCP segment of an existing connection far beyond its window,
from the connection's own end, as a server whose segment conntrack finds
out of window (kubernetes#74839).

usage: out_of_window.py SRC SPORT DST DPORT

It waits for a segment SRC:SPORT -> DST:DPORT to leave this namespace
(the caller makes the socket write), learns its sequence and
acknowledgment numbers, and sends a copy whose sequence number is 2^30
past them: over the upper bound of the receiver's window in any
conntrack, which marks it INVALID. Prints "ready" once it listens and
"sent" once the segment is out.
"""
import socket
import struct
import sys

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def main() -> None:
    src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    # Packets of every interface without link headers; only ETH_P_ALL taps
    # see outgoing ones.
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sniff.settimeout(10)
    print("ready", flush=True)
    while True:
        packet, (_, protocol, *_) = sniff.recvfrom(65535)
        if protocol != ETH_P_IP or packet[9] != socket.IPPROTO_TCP:
            continue
        if socket.inet_ntoa(packet[12:16]) != src or socket.inet_ntoa(packet[16:20]) != dst:
            continue
        tcp = packet[(packet[0] & 0x0F) * 4 :]
        ports_seq_ack = struct.unpack("!HHII", tcp[:12])
        if ports_seq_ack[:2] == (sport, dport):
            break
    seq, ack = ports_seq_ack[2:]
    payload = b"out of window"
    header = struct.pack(
        "!HHIIBBHHH", sport, dport, (seq + (1 << 30)) % (1 << 32), ack, 5 << 4, 0x18, 65535, 0, 0
    )
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst)
    pseudo += struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header) + len(payload))
    header = header[:16] + struct.pack("!H", checksum(pseudo + header + payload)) + header[18:]
    # The kernel fills in the IP header's length, id and checksum.
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw.sendto(ip + header + payload, (dst, 0))
    print("sent", flush=True)


main()
