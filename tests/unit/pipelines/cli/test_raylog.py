"""Ray's output kept off the console: every way a process prints (a logging handler, a Python warning, a
write to the descriptor as Ray's C++ core does, a child process) lands in the log file, featx's console still
reaches the real stderr, and the lines that matter come back as featx's one-line notes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pipelines.cli.raylog import translate, worker_line

ROOT = Path(__file__).resolve().parents[4]

# lines as Ray 2.60 printed them in `featx demo` and in the fault tests (shared/ENVIRONMENT.md has more)
TOKEN = ("2026-12-07 17:49:08,081\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
         "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
ACTOR_ARGS = ("[2026-12-07 17:49:12,358 E 28000 28000] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches"
              "(EmbedActor))' and ID: '0dd7' has constructor arguments in the object store and max_restarts > 0. If "
              "the arguments in the object store go out of scope or are lost, the actor restart will fail.")
PROGRESS = "2026-12-07 17:49:12,600\tINFO logging_progress.py:225 -- Total Progress: 0/?"
OOM = ("(raylet) [2026-12-07 18:01:02,114 E 311 311] (raylet) node_manager.cc:3224: 1 Workers (tasks / actors) killed "
       "due to memory pressure (OOM), 0 Workers crashed due to other reasons at node (ID: 9f2)")
UNKNOWN_WARNING = "2026-12-07 18:02:00,001\tWARNING some_module.py:12 -- something Ray thinks odd"


def test_what_matters_is_translated_what_is_harmless_is_not_shown_and_other_warnings_are_counted() -> None:
    assert translate(TOKEN) is None and translate(ACTOR_ARGS) is None  # harmless under featx (kept in the log)
    assert translate(PROGRESS) is None  # Ray Data's progress: the featx display shows it
    kind, message = translate(OOM)
    assert kind == "memory" and "batch_size" in message
    assert translate("Warning: The following resource request cannot be scheduled right now: {'GPU': 1.0}")[0] == \
        "unschedulable"
    assert translate("(raylet) Spilled 2048 MiB, 12 objects, write throughput 400 MiB/s")[0] == "spill"
    assert translate(UNKNOWN_WARNING) == ("other", "")


def test_featx_lines_that_workers_print_are_found_in_what_ray_forwards() -> None:
    assert worker_line("\x1b[36m(RayTrainWorker pid=8349)\x1b[0m featx: epoch 1/2: train loss 4.3") == \
        "epoch 1/2: train loss 4.3"
    assert worker_line("(MapWorker(MapBatches(EmbedActor)) pid=12, ip=10.0.0.2) featx: block of piece a: killed") == \
        "block of piece a: killed"
    assert worker_line("(pid=8536) Running Dataset train_1: 0.00 row") is None
    assert worker_line("featx: a driver line, not forwarded") is None


def test_every_kind_of_output_goes_to_the_log_and_the_console_keeps_the_terminal(tmp_path: Path) -> None:
    log = tmp_path / "ray.log"
    code = f"""
        import logging, os, subprocess, sys, warnings
        from rich.console import Console
        from pipelines.cli.raylog import RayLog
        ray_like = logging.getLogger("ray_like")  # a handler bound to stderr before the capture, as Ray's is
        ray_like.addHandler(logging.StreamHandler())
        said = []
        with RayLog(notice=said.append, path=__import__("pathlib").Path({str(log)!r})) as cap:
            console = Console(file=cap.terminal)
            mark = cap.mark()
            ray_like.warning({TOKEN!r})
            os.write(2, ({ACTOR_ARGS!r} + "\\n").encode())  # straight to the descriptor, as C++ code writes
            print("a worker's forwarded print")
            warnings.warn("write concurrency")
            subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write({OOM!r} + '\\\\n')"])
            console.print("featx: committed snapshot 1")
            share = cap.since(mark)
        Console(stderr=True).print("after: " + "|".join(said))
        print("stdout is back; lines in the run's share:", sum(w.encode() in share for w in ("Token", "core_worker",
                                                                                        "memory pressure")))
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    # the console reached the real stderr; nothing of Ray's did
    assert "featx: committed snapshot 1" in r.stderr
    for ray_words in ("Token authentication", "core_worker.cc", "forwarded print", "UserWarning", "memory pressure"):
        assert ray_words not in r.stderr and ray_words not in r.stdout, ray_words
    # the descriptors are restored, and the share cut out for a run (from its mark) holds what came after it
    assert r.stdout.strip() == "stdout is back; lines in the run's share: 3"
    # ... all of it is in the log
    text = log.read_text()
    for ray_words in ("Token authentication", "core_worker.cc", "a worker's forwarded print", "UserWarning",
                      "memory pressure"):
        assert ray_words in text, ray_words
    # the OOM line came back as featx's note (and only it: the token and actor lines are harmless)
    after = next(line for line in r.stderr.splitlines() if line.startswith("after: "))
    assert after.count("note: ") == 1 and "lack of memory" in after
