"""Helpers shared by the tests (no tests here), kept out of pytest's `test_*.py` collection.

- `engine`: test engine configs and processes, a byte-level SMTP client, spool reads.
- `abuse`: a self-signed certificate, STARTTLS on the raw client, process reads.
- `dkim`: DKIM keys on disk, verification with dkimpy and OpenDKIM.
- `http`: an engine with the operators' HTTP listener, HTTP calls.
"""
