"""The connector conformance suite: every registered connector against its SDK contract."""
