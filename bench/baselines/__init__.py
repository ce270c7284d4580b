"""Baselines measured in the same run as Tether (see ``payload_first``)."""
