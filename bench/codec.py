"""Codec throughput: messages per second encoded and decoded, JSON and CBOR.

    .venv/bin/python bench/codec.py [--repeat 3] [--seconds 0.3]

For each codec and each frame size (one message, batches of 10 and 100), it
times ``encode`` / ``encode_batch`` (messages to a frame, with the data-model
check) and ``decode_server_frame`` (a frame to messages, with every check a
client makes), repeats each measurement ``--repeat`` times and prints the
median as a Markdown table.  The message is a room event of about 300 bytes
(a streamed chunk of a task message).  Run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

from protocols import (
    CLIENT_LIMITS,
    Codec,
    Event,
    Message,
    decode_server_frame,
    encode,
    encode_batch,
)

EVENT = Event(
    "session:0193a1b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b",
    42,
    "task:message",
    data={
        "task_id": "0193a1b2-7c4d-7e8f-9a0b-000000000001",
        "message_id": "0193a1b2-7c4d-7e8f-9a0b-000000000002",
        "chunk": "Refactoring the room actor so that a batch is encoded once ",
        "index": 17,
        "done": False,
    },
    ts=1764100000000,
    user_id="user-7",
    origin="conn-3",
)
SIZES = (1, 10, 100)


def _rate(work: Callable[[], object], messages: int, seconds: float) -> float:
    """Messages per second of ``work`` (which handles ``messages`` per call)."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            work()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return loops * messages / elapsed
        loops = max(loops * 2, int(loops * seconds / max(elapsed, 1e-9)) + 1)


def _median(work: Callable[[], object], messages: int, seconds: float, repeat: int) -> float:
    return statistics.median(_rate(work, messages, seconds) for _ in range(repeat))


def run(repeat: int, seconds: float) -> list[tuple[str, int, int, float, float]]:
    rows = []
    for codec in Codec:
        for size in SIZES:
            payload: Message | list[Message] = EVENT if size == 1 else [EVENT] * size
            frame = encode(codec, payload)
            if size == 1:

                def encoder(codec: Codec = codec) -> object:
                    return encode(codec, EVENT)

            else:
                batch = [EVENT] * size

                def encoder(codec: Codec = codec, batch: list[Message] = batch) -> object:
                    return encode_batch(codec, batch)

            def decoder(codec: Codec = codec, frame: str | bytes = frame) -> object:
                return decode_server_frame(codec, frame, CLIENT_LIMITS)

            nbytes = len(frame.encode() if isinstance(frame, str) else frame)
            rows.append(
                (
                    codec.subprotocol,
                    size,
                    nbytes,
                    _median(encoder, size, seconds, repeat),
                    _median(decoder, size, seconds, repeat),
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--seconds", type=float, default=0.3, help="minimum time per run")
    args = parser.parse_args()
    print(
        f"# CPython {platform.python_version()}, {platform.machine()}; one event of "
        f"{len(encode(Codec.JSON, EVENT).encode())} JSON bytes; median of {args.repeat} runs"
    )
    print()
    print("| codec | messages per frame | frame bytes | encode msgs/s | decode msgs/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, size, nbytes, enc, dec in run(args.repeat, args.seconds):
        print(f"| {name} | {size} | {nbytes:,} | {enc:,.0f} | {dec:,.0f} |")


if __name__ == "__main__":
    main()
