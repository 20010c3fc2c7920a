"""What a Ray node agent does that needs no Ray: packing and unpacking the output folder."""

from __future__ import annotations

import io
import re
import tarfile
import threading

from anylearn_sdk.server.executors.node import pack_folder, unpack_into


def test_packing_an_output_that_a_rank_keeps_rewriting_gives_whole_archives(tmp_path):
    output = tmp_path / "output"
    (output / "sub").mkdir(parents=True)
    (output / "sub" / "model.bin").write_bytes(b"w" * 10_000)
    checkpoint = output / "progress.txt"
    checkpoint.write_text("0")
    stop = threading.Event()

    def rank() -> None:  # truncates and rewrites, as Path.write_text does, as fast as it can
        i = 0
        while not stop.is_set():
            i += 1
            checkpoint.write_text(f"{i}:" + "x" * (i % 5000))

    writer = threading.Thread(target=rank)
    writer.start()
    try:
        archives = [pack_folder(output) for _ in range(300)]
    finally:
        stop.set()
        writer.join()
    for archive in archives:  # each one reads to its end: no member shorter than its header
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}
        assert members["sub/model.bin"] == b"w" * 10_000
        text = members["progress.txt"].decode()
        # Caught between truncation and write it is empty; read across a rewrite, the start
        # of one version and the rest of the next (the next sync has a whole one).
        assert text in ("", "0") or re.fullmatch(r"\d+:x*", text), text
    dest = tmp_path / "copy"
    unpack_into(archives[-1], dest)
    assert (dest / "sub" / "model.bin").read_bytes() == b"w" * 10_000
