"""Tether's bench: time-to-task-id, stop and disconnect latency, scale and a cancel storm.

Run ``python -m bench --quick`` (under 3 minutes on 2 cores) or ``python -m bench --full``.
Every process (the loopback fakes, the Tether server, the payload-first baseline) is a real
separate process on 127.0.0.1; see ``bench/README.md``. ``--target URL`` measures a deployment
the bench did not start (``bench/target.py``), ``--peer litellm`` a peer gateway beside
Tether (``bench/peer.py``).
"""
