"""StopSignals: a SIGTERM ends the wait however early it comes and whichever thread receives it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import sys, threading, time
    from ct_ai_node.stop_signals import StopSignals

    # threads that exist before the install and leave every signal unblocked, like OpenBLAS's
    quit = threading.Event()
    workers = [threading.Thread(target=quit.wait, daemon=True) for _ in range(4)]
    for t in workers:
        t.start()
    with StopSignals() as stop:
        print("ready", flush=True)
        time.sleep(float(sys.argv[1]))      # busy elsewhere when the signal comes
        got = stop.wait(float(sys.argv[2]))
        print("stopped" if got else "timeout", stop.received.name if stop.received else "-", flush=True)
    quit.set()
""")


def _child(busy_s: float, wait_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(busy_s), str(wait_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_before_the_wait_is_kept_and_ends_it():
    for _ in range(5):
        proc = _child(busy_s=0.3, wait_s=20)
        proc.send_signal(signal.SIGTERM)  # arrives while the main thread sleeps, before wait()
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0, out
        assert out.split() == ["stopped", "SIGTERM"]


def test_sigint_during_the_wait_ends_it_without_keyboardinterrupt():
    proc = _child(busy_s=0.0, wait_s=20)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert out.split() == ["stopped", "SIGINT"]


def test_wait_times_out_without_a_signal():
    proc = _child(busy_s=0.0, wait_s=0.2)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert out.split() == ["timeout", "-"]


def test_ignored_signal_neither_stops_nor_kills():
    code = textwrap.dedent("""
        import signal
        from ct_ai_node.stop_signals import StopSignals
        with StopSignals((signal.SIGTERM,), ignored=(signal.SIGINT,)) as stop:
            print("ready", flush=True)
            first = stop.wait(1.0)
            print(first, stop.wait(20), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert out.split() == ["False", "True"]
