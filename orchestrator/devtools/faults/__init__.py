"""Fault injection for the reliability tests and report (issue 9): never imported by a real run."""
